"""Decoding image files and making the two views of a sample: the LPM's high-res input and the stored
low-res copy."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from fpt import FptError
from fpt.extract.dicom import read_dicom

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}

# Scanner exports are large (a 20k x 20k pathology or mammography export is 400 M pixels); PIL's default bomb
# guard (~179 M pixels) would refuse them. Above this, a file is refused as implausible.
MAX_PIXELS = 1_000_000_000


@contextmanager
def pixel_limit(limit: int):
    """PIL's decompression-bomb limit (a module global PIL reads in ``Image.open``) set for one ``open`` only,
    so importing fpt changes nothing for other code in the process."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def load_image_file(path: Path, size_hint: int | None = None, reduced_j2k: bool = False) -> Image.Image:
    """An image file (PNG, JPEG, TIFF, ... or DICOM) as ``to_supported_mode`` gives it, EXIF orientation applied;
    unreadable -> FptError naming the file. ``size_hint`` (the LPM side) lets JPEG decode at a reduced scale
    that still covers it, so huge JPEGs cost little memory; with ``reduced_j2k`` (``--j2k-decode reduced``) a
    JPEG 2000 DICOM decodes at the coarsest wavelet level that still covers it (``dicom.reduced_j2k_frame``)."""
    if path.suffix.lower() == ".dcm":
        return read_dicom(path, size_hint if reduced_j2k else None)
    try:
        with pixel_limit(MAX_PIXELS):
            opened = Image.open(path)
        with opened as im:
            if size_hint and im.format == "JPEG":
                im.draft(im.mode, (size_hint, size_hint))
            im.load()                                  # the pixels stay when the file closes
            # in place: the copying default copies every image, even one without an orientation tag
            ImageOps.exif_transpose(im, in_place=True)
            return to_supported_mode(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FptError(f"cannot read image {path}: {e}") from None


@dataclass(frozen=True)
class FileDecoding:
    """How a source decodes its files for an LPM of side ``res``: JPEGs at a reduced DCT scale that still covers
    it, and with ``reduced_j2k`` (``--j2k-decode reduced``) JPEG 2000 DICOMs at a coarser wavelet level too."""
    res: int | None = None
    reduced_j2k: bool = False

    def load(self, path: Path) -> Image.Image:
        return load_image_file(path, self.res, self.reduced_j2k)


def to_supported_mode(im: Image.Image) -> Image.Image:
    """An image ``prepare_image`` accepts: 8-bit RGB; 8-bit grey ("L": kept one channel until the LPM's device
    makes it RGB, so its resizes and transfers cost a third, with the same pixels as converting first); or for
    high-bit-depth grey (16-bit PNG/TIFF) a float image (mode "F", values in [0, 1], scaled by its own range) so
    precision is kept until the final resize."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return grey_float(np.asarray(im))
    mode = "L" if im.mode in ("L", "LA", "1") else "RGB"
    return im if im.mode == mode else im.convert(mode)      # convert() to the same mode would copy


def grey_float(a: np.ndarray) -> Image.Image:
    """grey [H, W] of any range and dtype -> PIL "F" image in [0, 1]: min-max scaled in float64, then float32.
    Unsigned 8/16-bit values are scaled once per possible value and looked up (the same numbers without a float64
    copy of the image: a 3328 x 2560 16-bit PNG, 106 -> 69 ms of CPU with the PIL image made)."""
    lo, hi = float(a.min()), float(a.max())
    if a.dtype.kind == "u" and a.dtype.itemsize <= 2:
        values = np.arange(2 ** (8 * a.dtype.itemsize), dtype=np.float64)
        table = ((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)).astype(np.float32)
        return Image.fromarray(table[a.astype(a.dtype.newbyteorder("="), copy=False)], mode="F")
    a = np.asarray(a, dtype=np.float64)
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return Image.fromarray(a.astype(np.float32), mode="F")


def prepare_image(image: Image.Image, res: int, image_res: int) -> tuple[np.ndarray, np.ndarray]:
    """The LPM's input (``lpm_input``) and the stored low-res copy of it (``low_res_copy``, here on the CPU), from
    an RGB, 8-bit grey or float grey ("F", [0, 1]) image: (high [res, res, C], low uint8 [image_res, image_res, 3]).
    Extraction makes the low-res copy on the LPM's device instead, from the same high-res input."""
    high = lpm_input(image, res)
    return high, low_res_copy(torch.from_numpy(high)[None], image_res)[0].numpy()


def lpm_input(image: Image.Image, res: int) -> np.ndarray:
    """The LPM's input from an RGB, 8-bit grey or float grey ("F", [0, 1]) image: [res, res, C] in [0, 255], C = 3
    for RGB, 1 for grey; uint8 from an 8-bit image, float32 from a float one. Resized with (antialiased) bicubic.
    A float image stays float until here, so 16-bit sources keep their precision through the resize; 8-bit pixels
    stay 8-bit, and grey stays one channel, until the LPM's device makes them float RGB (``stack_pixels``,
    ``encode_batch``: exact)."""
    return pixel_array(lpm_view(image, res))


def low_res_copy(high: torch.Tensor, image_res: int) -> torch.Tensor:
    """The stored low-res copy of LPM inputs, on their device: high [B, res, res, C] in [0, 255] (uint8 or float;
    C = 3, or 1 for grey) -> uint8 [B, image_res, image_res, 3].

    Downscaling is the area mean, the standard for it: each pixel the mean of the input pixels it covers (for res a
    multiple of image_res exactly the block means; torch's adaptive average pooling otherwise); upscaling is
    bicubic. Rounded to 8 bits once. Extraction runs it on the LPM's device (so the decode workers spend no CPU on
    it: ~1 ms per 512 px RGB image, ~3 at 1024 with PIL), prediction and ``prepare_image`` wherever the input is:
    the same numbers for a res that is a multiple of image_res, where no mean can land near a rounding boundary.
    On a CPU it costs more than PIL did (dev box, one thread: 3.2 ms per 512 px RGB image, 12.7 at 1024), next to
    an LPM step of seconds per image there."""
    x = high.permute(0, 3, 1, 2).float()                                   # [B, C, res, res]
    res = x.shape[-1]
    if res % image_res == 0:
        x = F.avg_pool2d(x, res // image_res) if res > image_res else x    # the block means
    elif image_res < res:
        x = F.adaptive_avg_pool2d(x, image_res)
    else:
        x = F.interpolate(x, size=(image_res, image_res), mode="bicubic", align_corners=False)
    low = x.round_().clamp_(0, 255).to(torch.uint8)
    return low.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()


def lpm_view(image: Image.Image, res: int) -> Image.Image:
    """The image as the LPM sees it: RGB, grey ("L") or float grey ("F"), resized to [res, res] with bicubic."""
    if image.mode not in ("RGB", "L", "F"):
        image = to_supported_mode(image)
    return image if image.size == (res, res) else image.resize((res, res), Image.Resampling.BICUBIC)


def pixel_array(image: Image.Image) -> np.ndarray:
    """[H, W, C] in [0, 255], writable, in the image's own precision and channels: uint8 from RGB (C = 3) or grey
    ("L", C = 1), float32 from float grey ("F" in [0, 1], C = 1)."""
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)[..., None] * 255
    a = np.array(image)
    return a if image.mode == "RGB" else a[..., None]


def three_channels(a: np.ndarray) -> np.ndarray:
    """[..., C] -> [..., 3]: grey (C = 1) repeated, RGB as it is."""
    return a if a.shape[-1] == 3 else np.repeat(a, 3, -1)


def rgb_array(image: Image.Image) -> np.ndarray:
    """float32 [H, W, 3] in [0, 255] from an RGB, a grey ("L") or a float grey ("F", [0, 1]) image."""
    return three_channels(pixel_array(image).astype(np.float32, copy=False))
