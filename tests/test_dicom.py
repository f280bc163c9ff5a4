"""DICOM decoding (fpt.extract.dicom) against plain numpy versions of the DICOM formulas, and on pydicom's own
bundled test files (compressed ones where a decoder plugin is installed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from fpt import FptError
from fpt.extract import dicom
from fpt.extract.images import prepare_image
from fpt.extract.dicom import read_dicom
from tests.helpers import j2k_dicom, smooth_stored, stored_12bit, write_dicom


def linear_window(v: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR), as a fraction of the output range."""
    return np.clip((v - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)


def decoded(path: Path) -> np.ndarray:
    image = read_dicom(path)
    assert image.mode == "F"
    return np.asarray(image, dtype=np.float64)


def test_modality_lut_then_window(tmp_path):
    x = stored_12bit()
    path = write_dicom(tmp_path / "a.dcm", x, window=(1500, 2000), rescale=(2.0, -100.0))
    expect = linear_window(2.0 * x - 100.0, 1500, 2000)
    assert 0 < expect.mean() < 1 and (expect == 0).any() and (expect == 1).any()     # the window bites
    np.testing.assert_allclose(decoded(path), expect, atol=1e-6)


def test_a_window_takes_the_modality_output_unrounded(tmp_path):
    """A window is a formula over real values (only a VOI LUT is indexed by integers): a rescale with a fractional
    slope and intercept gives values between integers, and they are windowed as they are, not rounded first."""
    x = stored_12bit(seed=8)
    path = write_dicom(tmp_path / "a.dcm", x, window=(1000, 300), rescale=(0.5, 0.25))
    expect = linear_window(0.5 * x + 0.25, 1000, 300)
    assert ((expect > 0) & (expect < 1)).mean() > 0.1                                 # many on the window's ramp
    np.testing.assert_allclose(decoded(path), expect, atol=1e-6)


def test_first_of_several_windows(tmp_path):
    x = stored_12bit(seed=1)
    path = write_dicom(tmp_path / "a.dcm", x, window=([1000, 3000], [800, 400]))
    np.testing.assert_allclose(decoded(path), linear_window(x, 1000, 800), atol=1e-6)


def test_monochrome1_is_inverted_with_and_without_window(tmp_path):
    x = stored_12bit(seed=2)
    plain = write_dicom(tmp_path / "m1.dcm", x, "MONOCHROME1", rescale=(0.5, 10.0))
    v = 0.5 * x + 10.0
    np.testing.assert_allclose(decoded(plain), 1 - (v - v.min()) / (v.max() - v.min()), atol=1e-6)
    windowed = write_dicom(tmp_path / "m1w.dcm", x, "MONOCHROME1", window=(2048, 1024))
    np.testing.assert_allclose(decoded(windowed), 1 - linear_window(x, 2048, 1024), atol=1e-6)
    # the same stored values as MONOCHROME2 give the mirror image
    m2 = write_dicom(tmp_path / "m2w.dcm", x, "MONOCHROME2", window=(2048, 1024))
    np.testing.assert_allclose(decoded(m2) + decoded(windowed), 1, atol=1e-6)


def test_no_voi_keeps_sixteen_bit_precision_until_the_resize(tmp_path):
    x = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16          # 4096 levels, 16-bit
    out = decoded(write_dicom(tmp_path / "a.dcm", x, bits=16))
    np.testing.assert_allclose(out, x / x.max(), atol=1e-6)
    assert len(np.unique(out)) == 4096                                    # not rounded to 8 bits
    high, low = prepare_image(read_dicom(tmp_path / "a.dcm"), 64, 32)
    assert len(np.unique(high)) > 256 and high.shape == (64, 64, 1) and low.dtype == np.uint8


def test_voi_lut_sequence_wins_and_uses_its_output_range(tmp_path):
    x = stored_12bit(seed=3) % 300
    first, lut = 50, np.linspace(1000, 3000, 200).astype(np.uint16)         # inputs 50..249 -> 1000..3000
    path = write_dicom(tmp_path / "a.dcm", x, window=(100, 10), voi_lut=(first, lut))
    expect = lut[np.clip(x.astype(int) - first, 0, len(lut) - 1)].astype(np.float64)
    np.testing.assert_allclose(decoded(path), (expect - 1000) / 2000, atol=1e-6)


def test_a_voi_lut_takes_the_modality_output_rounded_to_the_nearest_integer(tmp_path):
    """A VOI LUT is indexed by integers: a rescale with a fractional slope and intercept gives values between them,
    and each is looked up at its nearest integer (PS3.3 C.11.2.1.1), not truncated towards zero."""
    x = stored_12bit(seed=9) % 300
    first, lut = 20, np.linspace(1000, 3000, 120).astype(np.uint16)          # inputs 20..139
    path = write_dicom(tmp_path / "a.dcm", x, rescale=(0.5, 0.25), voi_lut=(first, lut))
    modality = 0.5 * x + 0.25                                                 # fractions .25 and .75: never a tie
    index = np.clip(np.rint(modality).astype(int) - first, 0, len(lut) - 1)
    assert (np.rint(modality) != np.floor(modality)).mean() > 0.3 and ((index > 0) & (index < 119)).mean() > 0.5
    np.testing.assert_allclose(decoded(path), (lut[index] - 1000.0) / 2000, atol=1e-6)


def test_multi_frame_gives_the_first_frame(tmp_path):
    frames = np.stack([stored_12bit(seed=4), stored_12bit(seed=5)])
    out = decoded(write_dicom(tmp_path / "a.dcm", frames))
    first = frames[0].astype(np.float64)
    np.testing.assert_allclose(out, (first - first.min()) / (first.max() - first.min()), atol=1e-6)


def enhanced_multi_frame(path: Path, frames: np.ndarray, shared: dict, first_frame: dict) -> Path:
    """An enhanced multi-frame file: display attributes only in functional groups (shared / frame 0's own)."""
    write_dicom(path, frames)
    ds = pydicom.dcmread(path)

    def group(attrs: dict) -> Dataset:
        out = Dataset()
        for macro, keywords in dicom.FRAME_DISPLAY_MACROS.items():
            item = Dataset()
            for keyword in keywords:
                if keyword in attrs:
                    setattr(item, keyword, attrs[keyword])
            if len(item):
                setattr(out, macro, Sequence([item]))
        return out

    ds.SharedFunctionalGroupsSequence = Sequence([group(shared)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([group(first_frame)] + [Dataset()] * (len(frames) - 1))
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multi_frame_uses_the_frames_functional_groups(tmp_path):
    frames = np.stack([stored_12bit(seed=6), stored_12bit(seed=7)])
    classic = decoded(write_dicom(tmp_path / "classic.dcm", frames[0], window=(1500, 2000), rescale=(2.0, -100.0)))
    # rescale shared by all frames, window given for frame 0 (and a shared window it must override)
    path = enhanced_multi_frame(tmp_path / "enhanced.dcm", frames,
                                shared={"RescaleSlope": 2.0, "RescaleIntercept": -100.0, "RescaleType": "US",
                                        "WindowCenter": 100, "WindowWidth": 50},
                                first_frame={"WindowCenter": 1500, "WindowWidth": 2000})
    np.testing.assert_allclose(decoded(path), classic, atol=1e-6)
    np.testing.assert_allclose(classic, linear_window(2.0 * frames[0] - 100.0, 1500, 2000), atol=1e-6)
    # only shared groups: they apply to frame 0
    shared_only = enhanced_multi_frame(tmp_path / "shared.dcm", frames, shared={
        "RescaleSlope": 2.0, "RescaleIntercept": -100.0, "WindowCenter": 1500, "WindowWidth": 2000}, first_frame={})
    np.testing.assert_allclose(decoded(shared_only), classic, atol=1e-6)


def test_rgb_dicom_is_rgb(tmp_path):
    rgb = np.random.default_rng(6).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    image = read_dicom(write_dicom(tmp_path / "a.dcm", rgb, "RGB"))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), rgb)


def test_rgb_of_more_than_eight_bits_maps_its_stored_range_onto_eight(tmp_path):
    """RGB with 12 of its 16 allocated bits stored: the stored range 0..4095 maps onto 0..255 (rounded), so a
    12-bit white is white; scaling by the allocated 16 bits would leave the image at a sixteenth of its light."""
    rgb = np.random.default_rng(7).integers(0, 4096, (10, 12, 3)).astype(np.uint16)
    image = read_dicom(write_dicom(tmp_path / "a.dcm", rgb, "RGB", bits=12))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.rint(rgb * (255 / 4095)).astype(np.uint8))


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return Path(path)


def need_decoder(path: Path) -> None:
    from pydicom import dcmread

    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if syntax.is_compressed and not get_decoder(syntax).is_available:
        pytest.skip(f"no pixel decoder for {syntax.name} installed (pip install 'fpt[dicom]')")


def test_bundled_uncompressed_files():
    from pydicom import dcmread

    ct = bundled("CT_small.dcm")                     # signed 16-bit with rescale, no window
    ds = dcmread(ct)
    v = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(decoded(ct), (v - v.min()) / (v.max() - v.min()), atol=1e-6)
    mr = bundled("MR_small.dcm")                     # window centre/width
    ds = dcmread(mr)
    centre, width = float(np.ravel(ds.WindowCenter)[0]), float(np.ravel(ds.WindowWidth)[0])
    np.testing.assert_allclose(decoded(mr), linear_window(ds.pixel_array.astype(np.float64), centre, width),
                               atol=1e-6)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm"])
def test_lossless_encodings_decode_like_the_uncompressed_file(name):
    path = bundled(name)
    need_decoder(path)
    np.testing.assert_allclose(decoded(path), decoded(bundled("MR_small.dcm")), atol=1e-6)


@pytest.mark.parametrize("name, mode, size", [("JPEG2000.dcm", "F", (256, 1024)),
                                              ("SC_rgb_jpeg_gdcm.dcm", "RGB", (100, 100)),
                                              ("SC_rgb_rle_16bit.dcm", "RGB", (100, 100)),
                                              ("JPGExtended.dcm", "F", (256, 1024))])
def test_bundled_compressed_files(name, mode, size):
    path = bundled(name)
    need_decoder(path)
    image = read_dicom(path)
    assert image.mode == mode and image.size == size
    a = np.asarray(image, dtype=np.float64)
    assert a.std() > 0 and (mode == "RGB" or (a.min() >= 0 and a.max() <= 1))


def test_unreadable_files_are_named(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("not a dicom file")
    with pytest.raises(FptError, match=f"cannot read DICOM {text}"):
        read_dicom(text)
    truncated = bundled("MR_truncated.dcm")
    with pytest.raises(FptError, match="cannot decode DICOM .*MR_truncated.dcm") as e:
        read_dicom(truncated)
    assert "\n" not in str(e.value)


def test_missing_decoder_names_the_extra(tmp_path, monkeypatch):
    path = bundled("JPEG2000.dcm")

    class Unavailable:
        is_available = False
    monkeypatch.setattr(dicom, "get_decoder", lambda syntax: Unavailable())
    with pytest.raises(FptError, match=r"no installed decoder for JPEG 2000.*fpt\[dicom\]"):
        read_dicom(path)


# ---------------------------------------------------------------- JPEG 2000 at a coarser wavelet level

def lowpass_53(x: np.ndarray, axis: int) -> np.ndarray:
    """One level of JPEG 2000's reversible 5/3 wavelet (ISO 15444-1 Annex F, lifting, whole-sample symmetric
    extension) along ``axis`` of an even-length integer array: the low-pass half."""
    x = np.moveaxis(x.astype(np.int64), axis, 0)
    even, odd = x[0::2], x[1::2]
    after = np.concatenate([even[1:], even[-1:]])             # x[2n + 2]; at the end x[N] = x[N - 2]
    high = odd - np.floor_divide(even + after, 2)
    before = np.concatenate([high[:1], high[:-1]])            # d[n - 1]; at the start d[-1] = d[0]
    return np.moveaxis(even + np.floor_divide(before + high + 2, 4), 0, axis)


def j2k_level(stored: np.ndarray, level: int, bits: int) -> np.ndarray:
    """What a JPEG 2000 decoder gives at ``level`` levels coarser: the DC-shifted image's low-pass band of each
    level (columns, then rows), shifted back and clipped to the stored range."""
    shift = 2 ** (bits - 1)
    band = stored.astype(np.int64) - shift
    for _ in range(level):
        band = lowpass_53(lowpass_53(band, 0), 1)
    return np.clip(band + shift, 0, 2 ** bits - 1)


@pytest.mark.parametrize("bits", [12, 16])
def test_reduced_j2k_decoding_is_the_wavelet_low_pass_at_the_coarsest_covering_level(tmp_path, bits):
    """A lossless JPEG 2000 mammogram-like file decoded for an LPM side of 100 (128 x 100 covers it, 64 x 50 does
    not) and of 50: exactly the 5/3 low-pass of one and two levels, through the same display chain as a full
    decode (window, [0, 1])."""
    stored = smooth_stored((256, 200), bits)
    path = j2k_dicom(tmp_path / "mg.dcm", stored, bits, window=(2 ** (bits - 1), 2 ** bits))
    ds = dicom.read_dataset(path)
    for side, level in [(100, 1), (50, 2), (64, 1)]:
        got = dicom.reduced_j2k_frame(ds, side)
        np.testing.assert_array_equal(got, j2k_level(stored, level, bits))
        image = read_dicom(path, reduce_to=side)
        assert image.mode == "F" and image.size == (200 // 2 ** level, 256 // 2 ** level)
        centre, width = 2 ** (bits - 1), 2 ** bits
        np.testing.assert_allclose(np.asarray(image, dtype=np.float64),
                                   linear_window(got.astype(np.float64), centre, width), atol=1e-6)
    full = read_dicom(path)
    np.testing.assert_array_equal(np.asarray(read_dicom(path, reduce_to=101)), np.asarray(full))   # no level covers
    assert dicom.reduced_j2k_frame(ds, 101) is None


def test_reduced_j2k_decoding_leaves_other_files_to_the_full_decode(tmp_path):
    """Uncompressed, 8-bit and signed JPEG 2000 files decode in full whatever ``reduce_to`` asks."""
    plain = write_dicom(tmp_path / "plain.dcm", smooth_stored((64, 64), 12))
    assert dicom.reduced_j2k_frame(dicom.read_dataset(plain), 16) is None
    np.testing.assert_array_equal(np.asarray(read_dicom(plain, reduce_to=16)), np.asarray(read_dicom(plain)))
    path = bundled("JPEG2000.dcm")                  # pydicom's own: signed 16-bit values
    need_decoder(path)
    ds = dicom.read_dataset(path)
    assert ds.PixelRepresentation == 1 and dicom.reduced_j2k_frame(ds, 64) is None
    ds.PixelRepresentation = 0                      # a header that says unsigned: the codestream's signed component
    assert dicom.reduced_j2k_frame(ds, 64) is None  # still decides


def _grey_dataset(bits: int = 12, signed: bool = False, photometric: str = "MONOCHROME2", **display) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian      # LUT data's byte order
    ds.PhotometricInterpretation, ds.BitsStored, ds.BitsAllocated = photometric, bits, 8 if bits <= 8 else 16
    ds.PixelRepresentation = int(signed)
    for name, value in display.items():
        setattr(ds, name, value)
    return ds


def _lut_item(first: int, data: np.ndarray, vr: str = "OW") -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(data), first, 16])
    item.add_new("LUTData", vr, np.asarray(data, dtype="<u2").tobytes())
    item.ModalityLUTType = "US"
    return item


@pytest.mark.parametrize("case", ["own range", "rescale + window", "linear exact", "sigmoid", "voi lut",
                                  "monochrome1", "signed ct", "8-bit", "modality lut", "big endian", "sparse values"])
def test_the_display_table_gives_the_chain_run_over_every_pixel(case):
    """For 8/16-bit pixels ``display_grey`` runs pydicom's chain once per possible value and looks the frame up:
    bit for bit what the chain gives run over every pixel (float64, then float32), for every kind of chain."""
    rng = np.random.default_rng(7)
    stored = rng.integers(0, 4096, (40, 56)).astype(np.uint16)
    ds = {
        "own range": lambda: _grey_dataset(),
        "rescale + window": lambda: _grey_dataset(RescaleSlope=2.0, RescaleIntercept=-100.0, WindowCenter=1500,
                                                  WindowWidth=2000),
        "linear exact": lambda: _grey_dataset(WindowCenter=2000, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT"),
        "sigmoid": lambda: _grey_dataset(WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID"),
        "voi lut": lambda: _grey_dataset(VOILUTSequence=Sequence([_lut_item(50, np.linspace(1000, 3000, 200))])),
        "monochrome1": lambda: _grey_dataset(photometric="MONOCHROME1", RescaleSlope=0.5, RescaleIntercept=10.0),
        "signed ct": lambda: _grey_dataset(16, True, RescaleSlope=1.0, RescaleIntercept=-1024.0, WindowCenter=40,
                                           WindowWidth=400),
        "8-bit": lambda: _grey_dataset(8),
        "modality lut": lambda: _grey_dataset(ModalityLUTSequence=Sequence([_lut_item(0, np.arange(4096)[::-1] * 3)])),
        "big endian": lambda: _grey_dataset(WindowCenter=2048, WindowWidth=1024),
        "sparse values": lambda: _grey_dataset(RescaleSlope=-1.0, RescaleIntercept=5000.0),
    }[case]()
    if case == "signed ct":
        stored = rng.integers(-2000, 3000, (40, 56)).astype(np.int16)
    elif case == "8-bit":
        stored = rng.integers(0, 256, (40, 56)).astype(np.uint8)
    elif case == "big endian":
        stored = stored.astype(">u2")
    elif case == "sparse values":                  # the own range is that of the values present, not of the table
        stored = rng.choice(np.array([100, 200, 3000], dtype=np.uint16), (40, 56))
    reference = dicom.display_chain(stored, ds, dicom.voi_output_range(ds)).astype(np.float32)
    out = dicom.display_grey(stored, ds)
    assert out.dtype == np.float32 and out.shape == stored.shape
    np.testing.assert_array_equal(out, reference)
    assert 0 < out.mean() < 1 and len(np.unique(out)) > 2
