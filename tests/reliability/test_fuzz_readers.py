"""Fuzzing the readers users point at their data: whatever the bytes, a source or one clear FptError.
(Fixed examples in the suite; see fuzzing.py to explore new ones.)"""
import functools
import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from fpt import FptError
from fpt.extract.datasets import CsvManifestSource, ImageFolderSource
from fpt.extract.images import load_image_file, prepare_image
from fpt.extract.dicom import read_dicom
from tests.helpers import j2k_dicom, smooth_stored
from tests.reliability.fuzzing import fuzz_settings

FUZZ = fuzz_settings(40)


def png_bytes(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".png", ".jpg", ".tif", ".dcm"]),
       prefix=st.sampled_from([b"", png_bytes()[:40], b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"DICM"]))
def test_image_files_read_or_fail_cleanly(tmp_path, data, suffix, prefix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes((b"\0" * 128 + prefix if suffix == ".dcm" else prefix) + data)
    try:
        image = load_image_file(path, size_hint=32)
    except FptError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    high, low = prepare_image(image, 32, 16)                     # whatever decoded is usable
    assert high.shape[:2] == (32, 32) and high.shape[2] in (1, 3) and low.shape == (16, 16, 3)


@FUZZ
@given(flip=st.integers(0, 10**6), cut=st.integers(0, 10**6))
@example(flip=0, cut=141)       # found by CI: a header cut mid-element raised pydicom's BytesLengthException
def test_damaged_real_dicom_reads_or_fails_cleanly(tmp_path, flip, cut):
    from pydicom.data import get_testdata_file

    original = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    data = bytearray(original)
    data[flip % len(data)] ^= 0xFF
    path = tmp_path / "ct.dcm"
    path.write_bytes(bytes(data[: max(1, cut % (len(data) + 1))]))
    try:
        image = read_dicom(path)
    except FptError as e:
        assert "\n" not in str(e)
        return
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


@functools.cache
def j2k_mammogram_bytes() -> bytes:
    """A small 12-bit lossless JPEG 2000 DICOM (with a window), made once."""
    with tempfile.TemporaryDirectory() as tmp:
        return j2k_dicom(Path(tmp) / "mg.dcm", smooth_stored((64, 48), 12), window=(2048, 4096)).read_bytes()


@FUZZ
@given(flip=st.integers(0, 10**6), cut=st.integers(0, 10**6))
def test_damaged_j2k_dicom_decoded_reduced_reads_or_fails_cleanly(tmp_path, flip, cut):
    """``--j2k-decode reduced`` on damaged JPEG 2000 (the codestream, the header): an image or one clear line."""
    data = bytearray(j2k_mammogram_bytes())
    data[flip % len(data)] ^= 0xFF
    path = tmp_path / "mg.dcm"
    path.write_bytes(bytes(data[: max(1, cut % (len(data) + 1))]))
    try:
        image = read_dicom(path, reduce_to=16)
    except FptError as e:
        assert "\n" not in str(e)
        return
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("path,label,split,group\n\"a.pngtrainvaltest01 ;\t")),
                    max_size=300))
@example(text='"0\n0')           # found by CI: a quoted header with a line break made a two-line error
def test_csv_manifests_load_or_fail_cleanly(tmp_path, text):
    (tmp_path / "a.png").write_bytes(png_bytes())
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    try:
        source = CsvManifestSource(manifest)
    except FptError as e:
        assert "\n" not in str(e)
        return
    assert {r.split for r in source.samples} == {0, 1, 2}       # a source it accepts has every split


@FUZZ
@given(layout=st.lists(st.tuples(st.sampled_from(["train", "val", "test", "other"]),
                                 st.sampled_from(["a", "b", ""]), st.sampled_from(["x.png", "y.txt", "z.jpg"])),
                       max_size=8))
def test_image_folders_list_or_fail_cleanly(tmp_path_factory, layout):
    root = tmp_path_factory.mktemp("tree")
    for split, cls, name in layout:
        folder = root / split / cls if cls else root / split
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png_bytes())
    try:
        source = ImageFolderSource(root)
    except FptError as e:
        assert "\n" not in str(e)
        return
    assert {r.split for r in source.samples} == {0, 1, 2}
    assert all(source.classes[r.label] == r.id.split("/")[1] for r in source.samples)
