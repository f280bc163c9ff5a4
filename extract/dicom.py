"""One DICOM file -> the image a radiologist would see: float grey in [0, 1] (PIL mode "F"), or 8-bit RGB.

Grey images go through the DICOM display chain: stored values -> modality LUT (rescale slope/intercept or a
Modality LUT Sequence) -> VOI LUT or the first window (centre/width) -> [0, 1] over that transform's output
range -> MONOCHROME1 inverted so that high means bright. Without a VOI the image is scaled by its own range.
Values stay float (no 8-bit rounding) until ``prepare_image``'s final resize, so 12-16-bit mammograms keep
their precision. Multi-frame files give their first frame; in enhanced multi-frame files (breast
tomosynthesis, enhanced MG/CT/MR) that frame's rescale and window come from its functional groups. Compressed
transfer syntaxes need a pydicom pixel decoder plugin: those beyond what Pillow decodes come with the ``dicom``
extra (``pip install 'fpt[dicom]'``).

JPEG 2000 grey images can also be decoded at a coarser wavelet level (``read_dicom(path, reduce_to=res)``, ``fpt
extract --j2k-decode reduced``): the decoder then skips the finer levels' code blocks, 4x faster per level for a
mammogram, and the image is the level's low-pass approximation, not bit-identical to a full decode after resizing
(bench/README.md gives both figures).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import JPEG2000, JPEG2000Lossless

from fpt import FptError

GREY = ("MONOCHROME1", "MONOCHROME2")
# enhanced multi-frame IODs keep the display attributes of each frame in functional-group macros
FRAME_DISPLAY_MACROS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"),
}
DICOM_EXTRA = "pip install 'fpt[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"


def read_dicom(path: Path, reduce_to: int | None = None) -> Image.Image:
    """The first frame of the DICOM file ``path`` as a PIL image: mode "F" [H, W] in [0, 1] for grey
    (MONOCHROME1/2), mode "RGB" [H, W, 3] uint8 for colour. Any problem -> FptError naming the file.
    ``reduce_to``: a JPEG 2000 grey frame is decoded at the coarsest wavelet level whose image still covers
    ``reduce_to`` x ``reduce_to`` (``reduced_j2k_frame``); other files decode in full."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # header quirks pydicom reads anyway (implicit VR, odd UIDs, ...)
        return _read_dicom(Path(path), reduce_to)


def _read_dicom(path: Path, reduce_to: int | None) -> Image.Image:
    ds = read_dataset(path)
    pixels = reduced_j2k_frame(ds, reduce_to) if reduce_to else None
    if pixels is None:
        pixels = first_frame(ds, path)
    try:
        if ds.get("PhotometricInterpretation") in GREY:
            return Image.fromarray(display_grey(pixels, frame_display_view(ds, 0)), mode="F")
        return Image.fromarray(display_rgb(pixels, ds))
    except (ValueError, AttributeError, KeyError, IndexError, TypeError, NotImplementedError) as e:
        raise FptError(f"cannot decode DICOM {path}: {one_line(e)}") from None


def read_dataset(path: Path, tags: list[str] | None = None) -> Dataset:
    """The parsed file, pixel data not yet decoded; with ``tags`` only those elements (pixel data not read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # header quirks pydicom reads anyway
            if tags is not None:
                return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            return pydicom.dcmread(path)
    except Exception as e:  # noqa: BLE001 - a damaged header raises anything from struct.error to BytesLengthException
        raise FptError(f"cannot read DICOM {path}: {one_line(e)}") from None


def first_frame(ds: Dataset, path: Path) -> np.ndarray:
    """Decoded stored values of frame 0: [H, W] (grey) or [H, W, 3] (colour, YCbCr converted to RGB)."""
    if "PixelData" not in ds:
        raise FptError(f"cannot decode DICOM {path}: it holds no pixel data")
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    try:
        decoder = get_decoder(syntax) if syntax else None
    except NotImplementedError:
        raise FptError(f"cannot decode DICOM {path}: transfer syntax {syntax.name} is not supported") from None
    if decoder is not None and not decoder.is_available:
        raise FptError(f"cannot decode DICOM {path}: no installed decoder for {syntax.name}; {DICOM_EXTRA}")
    try:
        return pixel_array(ds, index=0)
    except Exception as e:  # noqa: BLE001 - decoder plugins raise anything from RuntimeError to struct.error
        raise FptError(f"cannot decode DICOM {path} ({syntax.name if syntax else 'no transfer syntax'}): "
                       f"{one_line(e)}") from None


J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)


def reduced_j2k_frame(ds: Dataset, side: int) -> np.ndarray | None:
    """Stored values of frame 0 of a JPEG 2000 grey image, decoded at the coarsest wavelet level whose image
    (ceil(H / 2^level) x ceil(W / 2^level)) still covers ``side`` x ``side``: uint16 [h, w]. None where that does
    not apply or would not help (another transfer syntax, colour, signed or 8-bit values, no coarser level that
    covers ``side``, a codestream the decoder refuses at that level); the caller then decodes in full."""
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax not in J2K_SYNTAXES or ds.get("SamplesPerPixel", 1) != 1 or ds.get("PixelRepresentation", 0) != 0:
        return None
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)      # missing: the full decode says so
    level = 0
    while -(-min(rows, cols) // 2 ** (level + 1)) >= side:
        level += 1
    if level == 0 or "PixelData" not in ds:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
        codestream = get_j2k_parameters(frame)
        precision = codestream.get("precision")
        if precision is None or codestream["is_signed"] or not 8 < precision <= 16:
            return None
        with Image.open(io.BytesIO(frame)) as im:
            im.reduce = level              # Pillow's JPEG 2000 plugin: decode `level` wavelet levels coarser
            im.load()
            if im.mode != "I;16":
                return None
            # Pillow scales the values to 16 bits (a left shift by 16 - precision): undo it exactly
            values = np.asarray(im) >> (16 - precision)
    except Exception:  # noqa: BLE001 - any decoder trouble: the full decode says what is wrong, or succeeds
        return None
    return values if values.shape == (-(-rows // 2 ** level), -(-cols // 2 ** level)) else None


def frame_display_view(ds: Dataset, frame: int) -> Dataset:
    """``ds`` with the rescale and window of ``frame`` as top-level attributes, as a classic single-frame file
    has them: per-frame functional groups first, then the shared ones. ``ds`` itself when it has none.
    The view shares ``ds``'s elements (no pixel data copied)."""
    groups = [_item(ds, "PerFrameFunctionalGroupsSequence", frame), _item(ds, "SharedFunctionalGroupsSequence", 0)]
    found: dict[str, object] = {}
    for group in filter(None, groups):
        for macro, keywords in FRAME_DISPLAY_MACROS.items():
            item = _item(group, macro, 0)
            for keyword in keywords:
                if item is not None and keyword in item and keyword not in found:
                    found[keyword] = item[keyword].value
    if not found:
        return ds
    view = Dataset()
    for element in ds:
        if element.keyword not in ("PixelData", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            view.add(element)
    for keyword, value in found.items():
        setattr(view, keyword, value)
    return view


def _item(ds: Dataset, sequence: str, index: int) -> Dataset | None:
    items = ds.get(sequence)
    return items[index] if items is not None and len(items) > index else None


def display_grey(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """float32 [H, W] in [0, 1], bright = high: modality LUT, VOI LUT or first window, MONOCHROME1 inverted
    (``display_chain``, pydicom's transforms).

    The chain maps each stored value to one display value, so for 8- and 16-bit integer pixels it runs once per
    possible value (a table of at most 65,536 entries) and the frame is one look-up in that table: the same
    numbers as running it over every pixel in float64, at a fraction of the cost (a 3328 x 2560 mammogram with a
    window: 252 -> ~35 ms of CPU; bench/README.md). Other pixels (32-bit, float) go through the chain directly."""
    voi_range = voi_output_range(ds)
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:
        return display_chain(stored, ds, voi_range).astype(np.float32)
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    index = stored.view(f"u{stored.dtype.itemsize}")      # signed values by their bits: one table order for all
    values = np.arange(2 ** (8 * stored.dtype.itemsize), dtype=index.dtype).view(stored.dtype)
    # without a VOI the image is scaled by its own range: only the values present in the frame count
    present = None if voi_range is not None else np.bincount(index.ravel(), minlength=len(values)) > 0
    return display_chain(values, ds, voi_range, present).astype(np.float32)[index]


def display_chain(stored: np.ndarray, ds: Dataset, voi_range: tuple[float, float] | None,
                  present: np.ndarray | None = None) -> np.ndarray:
    """float64 in [0, 1] of ``stored`` (any shape), elementwise: modality LUT, then the VOI (``voi_range``: its
    output range, ``voi_output_range``) or, without one, [0, 1] over the range of the values (of those where
    ``present`` is true, when given), MONOCHROME1 mirrored."""
    values = apply_modality_lut(stored, ds)
    if voi_range is None:
        own = values if present is None else values[present]
        lo, hi = float(own.min()), float(own.max())
    else:
        values, (lo, hi) = apply_voi_lut(voi_input(values, ds), ds, index=0), voi_range
    values = np.asarray(values, dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":      # low values are bright: mirror within the range
        values = lo + hi - values
    if hi <= lo:
        return np.zeros(values.shape)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """(lowest, highest) value the dataset's VOI transform can give, or None when it has none.

    Found by running pydicom's own transform over its input domain: the whole LUT for a VOI LUT Sequence, two
    values far outside the window for windowing (LINEAR, LINEAR_EXACT and SIGMOID all saturate there)."""
    if ds.get("VOILUTSequence"):
        entries, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        probe = np.arange(first, first + (entries or 2**16))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        probe = np.array([-1e30, 1e30])
    else:
        return None
    with np.errstate(over="ignore"):
        out = apply_voi_lut(probe, ds, index=0)
    return float(np.min(out)), float(np.max(out))


def voi_input(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """A VOI LUT is indexed by integers: round the modality output for it; a window takes floats as they are."""
    return np.rint(values).astype(np.int64) if ds.get("VOILUTSequence") else values


def display_rgb(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """uint8 [H, W, 3] from RGB (any bit depth) or PALETTE COLOR stored values."""
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"photometric interpretation {ds.get('PhotometricInterpretation')!r} "
                         f"with pixel shape {pixels.shape} is neither grey nor RGB")
    if pixels.dtype == np.uint8:
        return pixels
    top = 2 ** (8 * pixels.dtype.itemsize) - 1 if ds.get("PhotometricInterpretation") == "PALETTE COLOR" \
        else 2 ** int(ds.BitsStored) - 1
    return np.clip(np.rint(pixels.astype(np.float64) * (255 / top)), 0, 255).astype(np.uint8)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
