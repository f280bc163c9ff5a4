"""Data sources for real datasets: CSV manifests, the CMMD collection (DICOM + clinical xlsx), the shared seeded
stratified group split, and --mean/--std auto."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from openpyxl import Workbook
from PIL import Image

from fpt import FptError
from fpt.cli import app
from fpt.config import extract_config, parse_normalization
from fpt.extract.cmmd import CLINICAL_TABLE, CmmdSource
from fpt.extract.datasets import (SPLITS, CsvManifestSource, compute_mean_std, open_source, resolve_normalization,
                                  stratified_group_split)
from fpt.store import StoreReader
from tests.helpers import MICRO_ARGS, fails_cleanly, runner, stored_12bit, write_dicom, write_manifest


# ---------------------------------------------------------------- CSV manifests

def grouped_rows(n_groups: int, seed: int = 0) -> list[dict]:
    """1-3 images per group (patient); the label is the group's, ~1/3 malignant."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "malignant" if g % 3 == 0 else "benign"
        rows += [{"path": f"images/p{g:03d}_{v}.png", "label": label, "group": f"p{g:03d}"}
                 for v in range(rng.integers(1, 4))]
    return rows


def test_manifest_with_split_column(tmp_path):
    rows = [{"path": f"images/{i}.png", "label": "cat" if i % 2 else "ant", "split": SPLITS[i % 3].upper()}
            for i in range(9)]
    source = CsvManifestSource(write_manifest(tmp_path, rows, ("path", "label", "split")))
    assert source.name == "manifest" and source.classes == ["ant", "cat"]
    assert [(s.id, s.label, s.split) for s in source.samples] == [
        (f"images/{i}.png", i % 2, i % 3) for i in range(9)]
    image = source.load(source.samples[0])
    assert image.mode == "RGB" and image.size == (26, 24)
    fixed = CsvManifestSource(tmp_path / "manifest.csv", classes=["cat", "ant"])       # the pipeline's order
    assert [s.label for s in fixed.samples] == [1 - i % 2 for i in range(9)]


def test_manifest_grouped_split_keeps_patients_together_and_is_stratified(tmp_path):
    rows = grouped_rows(120)
    csv_path = write_manifest(tmp_path, rows, ("path", "label", "group"), create_images=False)
    for row in rows:                                  # existence is all the listing checks; no need for pixels
        (tmp_path / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / row["path"]).touch()
    source = CsvManifestSource(csv_path, seed=3)
    split_of_group: dict[str, set[int]] = {}
    for row, sample in zip(rows, source.samples):
        assert sample.id == row["path"]
        split_of_group.setdefault(row["group"], set()).add(sample.split)
    assert all(len(s) == 1 for s in split_of_group.values())              # no patient in two splits
    n = len(rows)
    share = np.bincount([s.split for s in source.samples], minlength=3) / n
    np.testing.assert_allclose(share, [0.7, 0.1, 0.2], atol=0.05)
    for split in range(3):                                                 # every split has both classes
        malignant = np.mean([s.label for s in source.samples if s.split == split])
        assert 0.2 < malignant < 0.5
    again = CsvManifestSource(csv_path, seed=3)
    assert again.samples == source.samples                                 # deterministic
    assert CsvManifestSource(csv_path, seed=4).samples != source.samples   # and seeded


def test_rows_with_an_empty_group_are_each_a_group_of_their_own(tmp_path):
    """A group column with some cells empty (patients without an id): each such image is its own group, as
    without the column, so they are split like any images; they are not one big group "" that lands whole in one
    split (half the data set in train, say, or in test)."""
    grouped = grouped_rows(60)
    loose = [{"path": f"loose/{i:03d}.png", "label": "malignant" if i % 3 == 0 else "benign", "group": ""}
             for i in range(len(grouped))]
    rows = grouped + loose
    csv_path = write_manifest(tmp_path, rows, ("path", "label", "group"), create_images=False)
    for row in rows:
        (tmp_path / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / row["path"]).touch()
    source = CsvManifestSource(csv_path, seed=0)
    loose_splits = [s.split for s in source.samples if s.id.startswith("loose/")]
    assert len(loose_splits) == len(loose) and set(loose_splits) == {0, 1, 2}
    share = np.bincount(loose_splits, minlength=3) / len(loose)
    np.testing.assert_allclose(share, [0.7, 0.1, 0.2], atol=0.1)
    split_of_group: dict[str, set[int]] = {}
    for row, sample in zip(grouped, source.samples):
        split_of_group.setdefault(row["group"], set()).add(sample.split)
    assert all(len(s) == 1 for s in split_of_group.values())              # the named groups still kept whole


def test_split_without_groups_is_stratified_per_image():
    labels = [0] * 140 + [1] * 60
    splits = stratified_group_split(labels, [str(i) for i in range(200)], 0, "test")
    counts = Counter(zip(splits.tolist(), labels))
    assert [counts[(s, 0)] for s in range(3)] == [98, 14, 28]
    assert [counts[(s, 1)] for s in range(3)] == [42, 6, 12]
    with pytest.raises(FptError, match="needs at least 10 groups"):
        stratified_group_split([0, 1] * 20, ["a", "b", "c"] * 13 + ["d"], 0, "test")


def test_ten_groups_of_ten_per_class_are_enough_for_the_stratified_split():
    """The 70/10/20 split is ten stratified folds: ten groups and ten samples of the smallest class suffice (one
    per fold: 7 train, 1 val, 2 test of each class); nine do not."""
    labels = [0] * 10 + [1] * 10
    splits = stratified_group_split(labels, [str(i) for i in range(20)], 0, "test")
    counts = Counter(zip(splits.tolist(), labels))
    assert [counts[(s, c)] for c in (0, 1) for s in range(3)] == [7, 1, 2] * 2
    with pytest.raises(FptError, match="found 18 groups and 9 samples in the smallest class"):
        stratified_group_split([0] * 9 + [1] * 9, [str(i) for i in range(18)], 0, "test")


def test_a_manifest_is_known_by_its_suffix_in_any_case(tmp_path):
    """``--data MANIFEST.CSV`` (as some systems export it) is a manifest like ``manifest.csv``, not a folder."""
    rows = [{"path": f"images/{i}.png", "label": "ab"[i % 2], "split": SPLITS[i % 3]} for i in range(6)]
    upper = write_manifest(tmp_path, rows, ("path", "label", "split")).rename(tmp_path / "LIST.CSV")
    source = open_source(extract_config(None, upper, backbone="x", out=tmp_path / "o.zarr"))
    assert isinstance(source, CsvManifestSource) and source.name == "LIST"
    assert [s.id for s in source.samples] == [r["path"] for r in rows]


def test_bad_manifests_fail_with_one_line(tmp_path):
    ok = [{"path": f"images/{i}.png", "label": "a" if i % 2 else "b", "split": SPLITS[i % 3]} for i in range(6)]
    fails_cleanly(["extract", "--data", str(write_manifest(tmp_path / "c1", ok, ("path", "split"))), *MICRO_ARGS],
                  "missing column(s) label; expected path,label[,split][,group]")
    bad_split = [dict(r, split="training" if i == 2 else r["split"]) for i, r in enumerate(ok)]
    fails_cleanly(["extract", "--data", str(write_manifest(tmp_path / "c2", bad_split, ("path", "label", "split"))),
                   *MICRO_ARGS], "unknown split name(s) 'training'; use train, val or test")
    csv3 = write_manifest(tmp_path / "c3", ok, ("path", "label", "split"))
    (tmp_path / "c3" / "images" / "1.png").unlink()
    (tmp_path / "c3" / "images" / "4.png").unlink()
    fails_cleanly(["extract", "--data", str(csv3), *MICRO_ARGS],
                  "2 of 6 image files are missing (relative to " + str(tmp_path / "c3") + "), e.g. images/1.png, "
                  "images/4.png")
    no_val = [dict(r, split="train" if r["split"] == "val" else r["split"]) for r in ok]
    fails_cleanly(["extract", "--data", str(write_manifest(tmp_path / "c4", no_val, ("path", "label", "split"))),
                   *MICRO_ARGS], "the val split is empty")
    fails_cleanly(["extract", "--data", str(write_manifest(tmp_path / "c5", ok, ("path", "label"))), *MICRO_ARGS],
                  "a stratified 70/10/20 split needs at least 10 groups")
    fails_cleanly(["extract", "--dataset", "isic2016", "--data", str(csv3), *MICRO_ARGS],
                  "label(s) 'a', 'b' are not among the pipeline's classes ['benign', 'malignant']")
    twice = [*ok, dict(ok[1], path="./" + ok[1]["path"], split="test")]       # the same file, another split
    fails_cleanly(["extract", "--data", str(write_manifest(tmp_path / "c6", twice, ("path", "label", "split"))),
                   *MICRO_ARGS], "line 3 ('images/1.png') and line 8 ('./images/1.png') are the same image file")
    (tmp_path / "c3" / "images" / "1.png").mkdir()                      # a folder where an image should be
    fails_cleanly(["extract", "--data", str(csv3), *MICRO_ARGS], "1 of 6 paths are folders, not image files")
    one_class = [dict(r, label="a") for r in ok]
    fails_cleanly(["extract", "--data", str(write_manifest(tmp_path / "c7", one_class, ("path", "label", "split"))),
                   *MICRO_ARGS], "1 class ('a'); a classifier needs at least two")


def test_a_manifest_column_twice_and_an_image_listed_under_two_spellings_are_refused(tmp_path):
    """A column named twice (``path,path,label``, or ``label`` and ``Label``: names are read without case) was a
    KeyError traceback or silently read the last one; the same file as ``x.png``, ``../folder/x.png`` and an
    absolute path is one image listed twice (it would leak between splits)."""
    ok = [{"path": f"images/{i}.png", "label": "a" if i % 2 else "b", "split": SPLITS[i % 3]} for i in range(6)]
    csv_path = write_manifest(tmp_path / "c", ok, ("path", "label", "split"))
    lines = csv_path.read_text().splitlines()
    for header in ("path,path,label", "path,label,Label"):
        twice = tmp_path / "c" / "twice.csv"
        twice.write_text("\n".join([header, *(f"{r['path']},{r['label']},{r['label']}" for r in ok)]) + "\n")
        with pytest.raises(FptError, match=r"column\(s\) (path|label) appear more than once"):
            CsvManifestSource(twice)
    for alias in ("../c/images/1.png", str(tmp_path / "c" / "images" / "1.png")):
        aliased = tmp_path / "c" / "aliased.csv"
        aliased.write_text("\n".join([*lines, f"{alias},a,test"]) + "\n")
        with pytest.raises(FptError, match=r"line 3 \('images/1.png'\) and line 8 .* are the same image file"):
            CsvManifestSource(aliased)
    assert len(CsvManifestSource(csv_path).samples) == 6


def test_an_image_folder_with_one_file_under_two_names_is_refused_and_a_tree_of_links_is_not(tmp_path):
    """A link beside the file it points to (or to a file of another split) is that image twice: it would leak
    between splits. A tree whose every image is a link to files kept elsewhere (a common way to lay out a data
    set without copying it) lists each image once."""
    from fpt.extract.datasets import ImageFolderSource
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "d")
    target = sorted((data / "train" / "benign").glob("*.png"))[0]
    links = write_image_folder(tmp_path / "links")
    for image in sorted(links.rglob("*.png")):                             # every image: a link to one elsewhere
        kept = tmp_path / "kept" / image.relative_to(links)
        kept.parent.mkdir(parents=True, exist_ok=True)
        image.rename(kept)
        image.symlink_to(kept)
    assert len(ImageFolderSource(links).samples) == len(ImageFolderSource(data).samples)
    (data / "test" / "benign" / "alias.png").symlink_to(target)
    with pytest.raises(FptError, match=f"{target.relative_to(data).as_posix()} and test/benign/alias.png are the "
                                       "same image file"):
        ImageFolderSource(data)


def test_hidden_folders_and_files_are_neither_classes_nor_samples(tmp_path):
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "d")
    for split in SPLITS:                        # what notebooks and file browsers leave behind
        write_image_folder(data / split / ".ipynb_checkpoints", {"x": 1}, classes=("benign",))
        (data / split / "benign" / ".thumbs").mkdir()
        Image.new("RGB", (8, 8)).save(data / split / "benign" / ".thumbs" / "000.png")
    source = open_source(extract_config(None, data, out=str(tmp_path / "s.zarr"), **{"backbone": "x"}))
    assert source.classes == ["benign", "malignant"]
    assert len(source.samples) == 16 and not any("/." in s.id for s in source.samples)


def test_class_folders_differing_only_in_surrounding_spaces_are_refused(tmp_path):
    """``benign`` and ``benign `` (a trailing space a file manager hides) are one class spelt two ways: refused,
    like two spellings that differ in case, rather than silently split in two."""
    from fpt.extract.datasets import ImageFolderSource
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "d", {"train": 1, "val": 1, "test": 1}, classes=("benign", "benign ", "x"))
    with pytest.raises(FptError, match="classes 'benign' and 'benign ' differ only in case or spaces"):
        ImageFolderSource(data)


def test_image_folder_labels_follow_the_pipelines_class_order(tmp_path):
    """A pipeline that fixes the class order (``classes: [malignant, benign]``) fixes the labels: label i is the
    pipeline's class i, whatever the folders' sorted order, so a store's labels mean what its classes say."""
    from fpt.extract.datasets import ImageFolderSource
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "d")
    order = sorted(["benign", "malignant"], reverse=True)              # not the folders' sorted order
    source = ImageFolderSource(data, classes=order)
    assert source.classes == order
    assert all(source.classes[s.label] == s.id.split("/")[1] for s in source.samples)


def test_every_source_refuses_an_empty_split_the_same_way(tmp_path):
    """One rule (``check_splits_filled``) for image folders, manifests and the synthetic task alike."""
    from fpt.extract.datasets import ImageFolderSource, SyntheticTextureSource
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "d")
    for image in (data / "val").rglob("*.png"):        # class folders left, without images
        image.unlink()
    with pytest.raises(FptError, match=f"{data}: the val split is empty"):
        ImageFolderSource(data)
    with pytest.raises(FptError, match="the synthetic data set: the test split is empty"):
        SyntheticTextureSource({"train": 4, "val": 2, "test": 0}, res=32)


def test_extract_from_manifest_end_to_end_with_auto_normalisation(tmp_path):
    rows = grouped_rows(30, seed=1)
    csv_path = write_manifest(tmp_path / "data", rows, ("path", "label", "group"))
    write_dicom(tmp_path / "data" / "images" / "p000_0.dcm", stored_12bit(), "MONOCHROME1", window=(2000, 3000))
    rows[0]["path"] = "images/p000_0.dcm"                                  # a manifest may list DICOM files too
    csv_path = write_manifest(tmp_path / "data", rows, ("path", "label", "group"), create_images=False)
    store = tmp_path / "m.zarr"
    result = runner.invoke(app, ["extract", "--data", str(csv_path), *MICRO_ARGS, "--out", str(store),
                                 "--mean", "auto", "--std", "auto"])
    assert result.exit_code == 0, result.output
    reader = StoreReader(store)
    source = CsvManifestSource(csv_path)
    assert list(reader.ids) == [r["path"] for r in rows]
    np.testing.assert_array_equal(reader.labels, [s.label for s in source.samples])
    np.testing.assert_array_equal(reader.split, [s.split for s in source.samples])
    assert reader.attrs["dataset"]["name"] == "manifest" and reader.attrs["dataset"]["classes"] == ["benign",
                                                                                                   "malignant"]
    mean, std = compute_mean_std(source, 64)
    np.testing.assert_allclose(reader.attrs["normalization"]["mean"], mean)
    np.testing.assert_allclose(reader.attrs["normalization"]["std"], std)
    assert reader.done().all()


# ---------------------------------------------------------------- --mean/--std auto

def test_compute_mean_std_is_over_the_train_split_at_lpm_resolution(tmp_path):
    rows = [{"path": f"images/{i}.png", "label": "a" if i % 2 else "b", "split": SPLITS[min(i // 4, 2)]}
            for i in range(12)]
    source = CsvManifestSource(write_manifest(tmp_path, rows, ("path", "label", "split")))
    train = [np.asarray(Image.open(tmp_path / r["path"]).convert("RGB").resize((40, 40), Image.Resampling.BICUBIC),
                        dtype=np.float64) / 255 for r in rows[:4]]
    mean, std = compute_mean_std(source, 40)
    np.testing.assert_allclose(mean, np.stack(train).mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(std, np.stack(train).std(axis=(0, 1, 2)), rtol=1e-9)
    white = np.full((24, 26, 3), 255, np.uint8)
    Image.fromarray(white).save(tmp_path / rows[-1]["path"])              # a test image does not count
    assert compute_mean_std(source, 40) == (mean, std)


def test_auto_stays_literal_in_config_until_run_time(tmp_path):
    assert parse_normalization("auto", "mean") == "auto" and parse_normalization("0.5", "std") == (0.5,) * 3
    rows = [{"path": f"images/{i}.png", "label": "ab"[i % 2], "split": SPLITS[i % 3]} for i in range(6)]
    csv_path = write_manifest(tmp_path, rows, ("path", "label", "split"))
    cfg = extract_config(None, csv_path, mean="auto", std=(0.229, 0.224, 0.225), backbone="x", out=tmp_path / "o.zarr")
    assert cfg.mean == "auto" and cfg.std == (0.229, 0.224, 0.225) and cfg.name == "manifest"
    resolved = resolve_normalization(cfg, open_source(cfg))
    assert resolved.mean == compute_mean_std(open_source(cfg), cfg.res)[0] and resolved.std == cfg.std


def test_std_auto_with_a_given_mean_keeps_that_mean(tmp_path):
    """--std auto with --mean R,G,B: only the std is the train split's; the mean given stays, not replaced by the
    computed one (the converse of the case above)."""
    rows = [{"path": f"images/{i}.png", "label": "ab"[i % 2], "split": SPLITS[i % 3]} for i in range(6)]
    csv_path = write_manifest(tmp_path, rows, ("path", "label", "split"))
    cfg = extract_config(None, csv_path, mean=(0.485, 0.456, 0.406), std="auto", backbone="x", out=tmp_path / "o.zarr")
    mean, std = compute_mean_std(open_source(cfg), cfg.res)
    resolved = resolve_normalization(cfg, open_source(cfg))
    assert resolved.mean == cfg.mean != mean and resolved.std == std


@pytest.mark.parametrize("colour", [(0, 0, 0), (90, 90, 90), (37, 200, 13)])
def test_std_auto_over_train_images_without_variation_is_refused(tmp_path, colour):
    """--std auto over train images of one colour: a std of ~0 for every colour (the one-pass sums of x and x^2
    left ~1e-7 to 2e-6 of rounding for most), refused, whatever the val and test images hold (normalising by it
    would divide by zero or overflow fp16); a std given keeps such a data set usable."""
    rows = [{"path": f"images/{i}.png", "label": "ab"[i % 2], "split": SPLITS[i % 3]} for i in range(6)]
    csv_path = write_manifest(tmp_path, rows, ("path", "label", "split"))
    for row in rows[::3]:                                                  # the train images: one colour
        Image.new("RGB", (26, 24), colour).save(tmp_path / row["path"])
    cfg = extract_config(None, csv_path, mean="auto", std="auto", backbone="x", out=tmp_path / "o.zarr")
    mean, std = compute_mean_std(open_source(cfg), cfg.res)
    np.testing.assert_allclose(mean, np.array(colour) / 255, rtol=1e-9)
    assert max(std) < 1e-6
    with pytest.raises(FptError, match="--std auto: the train images have no variation"):
        resolve_normalization(cfg, open_source(cfg))
    given = extract_config(None, csv_path, mean="auto", std=(0.2,) * 3, backbone="x", out=tmp_path / "o.zarr")
    assert resolve_normalization(given, open_source(given)).std == (0.2,) * 3


# ---------------------------------------------------------------- CMMD

PATIENTS = [f"D1-{i:04d}" for i in range(1, 13)]


def cmmd_label(patient_index: int, side: str) -> str:
    """Left breasts of even patients and right breasts of every third are malignant."""
    return "Malignant" if (side == "L" and patient_index % 2 == 0) or (side == "R" and patient_index % 3 == 0) \
        else "Benign"


def write_cmmd(root: Path, under_cmmd_folder: bool = True) -> dict[tuple[str, str], str]:
    """A CMMD-shaped tree: 12 patients in the table, both breasts, CC + MLO each (48 images), plus one patient
    missing from the table (2 images) and one image without laterality. Returns (patient, side) -> class."""
    tree = root / "CMMD" if under_cmmd_folder else root
    book = Workbook()
    sheet = book.active
    sheet.append(["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"])
    table = {}
    for p, patient in enumerate(PATIENTS):
        for side in "LR":
            sheet.append([patient, side, 40 + p, 1, "mass", cmmd_label(p, side), None])
            table[(patient, side)] = cmmd_label(p, side).lower()
    root.mkdir(parents=True, exist_ok=True)
    book.save(root / CLINICAL_TABLE)
    seed = 0
    for p, patient in enumerate(PATIENTS + ["D2-0999"]):
        series = tree / patient / "07-18-2010-NA-NA-79377" / "1.000000-NA-70244"
        for i, (side, view) in enumerate([(s, v) for s in "LR" for v in ("CC", "MLO")]):
            seed += 1
            photometric = "MONOCHROME1" if p % 2 else "MONOCHROME2"
            tag = "Laterality" if p == 3 else "ImageLaterality"          # the older tag also counts
            write_dicom(series / f"1-{i + 1}.dcm", stored_12bit((20, 16), seed), photometric,
                        window=(2048, 4096) if p % 4 == 0 else None, rescale=(1.0, -5.0) if p == 5 else None,
                        patient=None if p == 7 else patient, laterality=side, laterality_tag=tag)
            if patient == "D2-0999" and i == 1:
                break
    write_dicom(tree / PATIENTS[0] / "other" / "unknown-side.dcm", stored_12bit((20, 16), 99))
    return table


def breast_of(root: Path, ref_id: str) -> tuple[str, str]:
    """(patient, side) of the image ``ref_id`` = CMMD/<patient>/..., its side read back from the file."""
    from pydicom import dcmread

    header = dcmread(root / ref_id, stop_before_pixels=True)
    return Path(ref_id).parts[1], str(header.get("ImageLaterality") or header.get("Laterality"))


def test_cmmd_labels_per_breast_split_by_patient(tmp_path):
    table = write_cmmd(tmp_path / "cmmd")
    source = CmmdSource(tmp_path / "cmmd", classes=["benign", "malignant"], seed=0)
    assert len(source.samples) == 48 and source.classes == ["benign", "malignant"]
    assert source.attrs["skipped_images"] == {"breast_not_in_table": 2, "no_laterality": 1}
    patients_split: dict[str, set[int]] = {}
    for ref in source.samples:
        assert ref.id.startswith("CMMD/D1-") and ref.id.endswith(".dcm")
        patient, side = breast_of(tmp_path / "cmmd", ref.id)
        assert source.classes[ref.label] == table[(patient, side)]
        patients_split.setdefault(patient, set()).add(ref.split)
    assert set(patients_split) == set(PATIENTS)
    assert all(len(s) == 1 for s in patients_split.values())              # no patient in two splits
    assert {s for splits in patients_split.values() for s in splits} == {0, 1, 2}
    assert CmmdSource(tmp_path / "cmmd", seed=0).samples == source.samples  # deterministic
    image = source.load(source.samples[0])
    assert image.mode == "F" and image.size == (16, 20)


def test_cmmd_without_the_cmmd_folder_level(tmp_path):
    write_cmmd(tmp_path / "flat", under_cmmd_folder=False)
    source = CmmdSource(tmp_path / "flat")
    assert len(source.samples) == 48 and source.samples[0].id.startswith("D1-0001/")
    assert source.classes == ["benign", "malignant"]


def test_cmmd_table_sides_in_lower_case_label_the_same_breasts(tmp_path):
    """The clinical table's LeftRight column read in any case: ``l``/``r`` are the breasts ``L``/``R`` of the DICOM
    headers, so every image keeps its label rather than being skipped as a breast not in the table."""
    from openpyxl import load_workbook

    write_cmmd(tmp_path / "cmmd")
    want = CmmdSource(tmp_path / "cmmd")
    book = load_workbook(tmp_path / "cmmd" / CLINICAL_TABLE)
    for (cell,) in book.active.iter_rows(min_row=2, min_col=2, max_col=2):
        cell.value = cell.value.lower()
    book.save(tmp_path / "cmmd" / CLINICAL_TABLE)
    got = CmmdSource(tmp_path / "cmmd")
    assert got.samples == want.samples and len(got.samples) == 48
    assert got.attrs["skipped_images"] == {"breast_not_in_table": 2, "no_laterality": 1}


def test_cmmd_problems(tmp_path):
    root = tmp_path / "c"
    write_cmmd(root)
    (root / CLINICAL_TABLE).rename(root / "elsewhere.txt")
    fails_cleanly(["extract", "--dataset", "cmmd", "--data", str(root), *MICRO_ARGS],
                  f"expected the clinical table {CLINICAL_TABLE} in it")
    book = Workbook()
    book.active.append(["ID1", "LeftRight", "Age"])
    book.save(root / CLINICAL_TABLE)
    fails_cleanly(["extract", "--dataset", "cmmd", "--data", str(root), *MICRO_ARGS],
                  "missing column(s) classification")
    (root / CLINICAL_TABLE).write_bytes(b"not a spreadsheet")
    fails_cleanly(["extract", "--dataset", "cmmd", "--data", str(root), *MICRO_ARGS], "cannot read the clinical table")


def test_extract_cmmd_end_to_end(tmp_path):
    root = tmp_path / "cmmd"
    table = write_cmmd(root)
    store = tmp_path / "cmmd.zarr"
    result = runner.invoke(app, ["extract", "--dataset", "cmmd", "--data", str(root), *MICRO_ARGS,
                                 "--out", str(store)])
    assert result.exit_code == 0, result.output
    reader = StoreReader(store)
    assert reader.done().all() and len(reader.ids) == 48
    classes = reader.attrs["dataset"]["classes"]
    for ref_id, label in zip(reader.ids, reader.labels):
        assert classes[label] == table[breast_of(root, ref_id)]
    counts = reader.attrs["dataset"]["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == 48 and all(sum(c.values()) for c in counts.values())
