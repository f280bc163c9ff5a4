"""Images as scanners and archives produce them: handled correctly, or skipped and reported (--on-error skip)."""
import csv
import io

import numpy as np
from PIL import Image

from fpt.cli import app
from fpt.extract.images import load_image_file
from fpt.store import StoreReader
from tests.conftest import write_image_folder
from tests.helpers import MICRO_ARGS, fails_cleanly, runner


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def handled_images(folder):
    """Unusual but valid images -> what load_image_file must give for each."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16)).save(folder / "grey16.png")
    Image.fromarray(np.dstack([rgb, np.full((30, 40), 128, np.uint8)]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.new("L", (20000, 20000), 90).save(folder / "huge.jpg", quality=50)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                       # orientation: rotate 90 degrees clockwise
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif.tobytes())
    return {"grey16.png": ("F", (40, 30)), "rgba.png": ("RGB", (40, 30)), "palette.png": ("RGB", (40, 30)),
            "cmyk.jpg": ("RGB", (40, 30)), "huge.jpg": ("L", (2500, 2500)), "one.png": ("RGB", (1, 1)),
            "rotated.jpg": ("RGB", (30, 40))}


def broken_images(folder):
    good = jpeg_bytes(Image.new("RGB", (64, 64), (200, 10, 10)))
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.png").write_text("this is a text file, not an image")
    return ["empty.png", "truncated.jpg", "notes.png"]


def test_unusual_images_load_correctly(tmp_path):
    for name, (mode, size) in handled_images(tmp_path).items():
        im = load_image_file(tmp_path / name, size_hint=64)
        assert (im.mode, im.size) == (mode, size), name
    assert load_image_file(tmp_path / "one.png").getpixel((0, 0)) == (10, 20, 30)


def test_a_jpeg_decodes_at_the_coarsest_scale_that_still_covers_the_lpm_input(tmp_path):
    """``size_hint`` (the LPM's side) lets a JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8), the coarsest whose
    image still covers it on both sides: never smaller, or the LPM input would be upsampled from less detail."""
    rgb = np.random.default_rng(1).integers(0, 255, (320, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    for hint, size in ((64, (100, 80)), (100, (200, 160)), (160, (200, 160)), (161, (400, 320)), (30, (50, 40))):
        assert load_image_file(tmp_path / "a.jpg", size_hint=hint).size == size, hint
    assert load_image_file(tmp_path / "a.jpg").size == (400, 320)


def test_broken_images_fail_with_their_path_by_default(tmp_path):
    data = write_image_folder(tmp_path / "d")
    for name in broken_images(data / "train" / "benign")[:1]:
        fails_cleanly(["extract", "--data", str(data), *MICRO_ARGS, "--out", str(tmp_path / "s.zarr")],
                      f"cannot read image {data / 'train' / 'benign' / name}")


def test_skip_reports_broken_images_and_keeps_the_rest(tmp_path):
    data = write_image_folder(tmp_path / "d")
    handled = handled_images(data / "val" / "malignant")
    broken = broken_images(data / "train" / "benign")
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["extract", "--data", str(data), *MICRO_ARGS, "--out", str(store),
                                 "--on-error", "skip"])
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable images" in " ".join(result.output.split())
    reader = StoreReader(store)
    reader.require_complete()
    with open(store / "skipped.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(f"train/benign/{n}" for n in broken)
    assert all(r["error"].startswith("cannot read image") for r in rows)
    excluded = [int(r["index"]) for r in rows]
    assert (reader.split[excluded] == 255).all()
    assert not set(excluded) & set(reader.split_indices("train"))
    assert len(reader.split_indices("val")) == 4 + len(handled)          # every unusual image was kept
    assert reader.attrs["last_run"]["skipped"] == 3
    again = runner.invoke(app, ["extract", "--data", str(data), *MICRO_ARGS, "--out", str(store),
                                "--on-error", "skip"])
    assert again.exit_code == 0 and "nothing to do" in again.output   # skipped samples are settled, not retried


def test_a_class_whose_train_images_were_all_skipped_is_refused_by_train(tmp_path):
    """Extraction refuses a class without train images, but --on-error skip can leave one without any afterwards:
    fpt train then trained a classifier that never saw the class (and reported metrics as if nothing were
    wrong). It is refused by name, before any run folder is made."""
    data = write_image_folder(tmp_path / "d", {"train": 4, "val": 2, "test": 2})
    for path in (data / "train" / "benign").iterdir():
        path.write_text("not an image")
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["extract", "--data", str(data), *MICRO_ARGS, "--out", str(store),
                                 "--on-error", "skip", "--mean", "0.5", "--std", "0.25"])
    assert result.exit_code == 0 and "skipped 4 unreadable images" in " ".join(result.output.split())
    fails_cleanly(["train", "--store", str(store), "--side-res", "16", "--epochs", "1", "--batch-size", "2",
                   "--device", "cpu", "--out", str(tmp_path / "run")],
                  "class(es) 'benign' have no train samples (their train images were skipped as unreadable")
    assert not (tmp_path / "run").exists()
