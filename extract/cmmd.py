"""The Chinese Mammography Database (CMMD) as TCIA distributes it.

    DATA/CMMD_clinicaldata_revision.xlsx         ID1, LeftRight, Age, number, abnormality, classification, subtype
    DATA/CMMD/<patient>/<study>/<series>/*.dcm   (or the patient folders directly under DATA)

The label belongs to a breast: the patient (DICOM PatientID, else the top folder) and the side (ImageLaterality,
else Laterality) are looked up in the clinical table (ID1, LeftRight L/R -> Benign/Malignant). Images of breasts
that the table does not list are skipped and counted. Splits: seeded, stratified 70/10/20, grouped by patient.
"""
from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

from PIL import Image

from fpt import FptError
from fpt.extract.samples import SampleRef, check_splits_filled, class_names, stratified_group_split
from fpt.extract.dicom import read_dataset
from fpt.extract.images import FileDecoding

CLINICAL_TABLE = "CMMD_clinicaldata_revision.xlsx"
TABLE_COLUMNS = ("ID1", "LeftRight", "classification")
HEADER_TAGS = ["PatientID", "ImageLaterality", "Laterality"]


class CmmdSource:
    """CMMD images with per-breast labels; ``attrs`` reports the table used and the images skipped."""

    def __init__(self, root: Path, classes: list[str] | None = None, seed: int = 0,
                 decoding: FileDecoding = FileDecoding()):
        self.root, self.name, self.decoding = Path(root), "cmmd", decoding
        if not self.root.is_dir():
            raise FptError(f"CMMD data {self.root}: expected a folder holding {CLINICAL_TABLE} and CMMD/")
        table_path = find_clinical_table(self.root)
        table = read_clinical_table(table_path)
        self.classes = class_names(list(table.values()), classes, str(table_path))
        images, skipped = labelled_images(self.root, table)
        if not images:
            raise FptError(f"CMMD data {self.root}: none of its DICOM images belongs to a breast listed in "
                           f"{table_path.name} (skipped: {dict(skipped) or 'no .dcm files found'})")
        labels = [self.classes.index(label) for _, _, label in images]
        splits = stratified_group_split(labels, [patient for _, patient, _ in images], seed, f"CMMD at {self.root}")
        self.samples = [SampleRef(path, label, int(split))
                        for (path, _, _), label, split in zip(images, labels, splits)]
        check_splits_filled(self.samples, f"CMMD at {self.root}")
        self.attrs = {"clinical_table": table_path.name, "skipped_images": dict(skipped)}

    def load(self, ref: SampleRef) -> Image.Image:
        return self.decoding.load(self.root / ref.id)      # a .dcm file (labelled_images lists only those)


def find_clinical_table(root: Path) -> Path:
    """``root/CMMD_clinicaldata_revision.xlsx``, or the only .xlsx file in ``root``."""
    if (root / CLINICAL_TABLE).is_file():
        return root / CLINICAL_TABLE
    found = sorted(root.glob("*.xlsx"))
    if len(found) != 1:
        raise FptError(f"CMMD data {root}: expected the clinical table {CLINICAL_TABLE} in it "
                       f"(found {', '.join(p.name for p in found) or 'no .xlsx file'})")
    return found[0]


def read_clinical_table(path: Path) -> dict[tuple[str, str], str]:
    """(patient ID1, side "L"/"R") -> lower-case classification ("benign"/"malignant") from the first sheet."""
    from openpyxl import load_workbook                           # only CMMD needs it
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = load_workbook(path, read_only=True, data_only=True)
        rows = [[cell_text(v) for v in row] for row in book.worksheets[0].iter_rows(values_only=True)]
        book.close()
    except (OSError, InvalidFileException, zipfile.BadZipFile, KeyError, ValueError, IndexError) as e:
        raise FptError(f"cannot read the clinical table {path}: {e}") from None
    rows = [row for row in rows if any(row)]
    header = rows[0] if rows else []
    missing = [c for c in TABLE_COLUMNS if c not in header]
    if missing:
        raise FptError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(TABLE_COLUMNS)}")
    patient, side, label = (header.index(c) for c in TABLE_COLUMNS)
    table: dict[tuple[str, str], str] = {}
    for row in rows[1:]:
        key, value = (row[patient], row[side].upper()), row[label].lower()
        if not all(key) or not value:
            continue
        if table.setdefault(key, value) != value:
            raise FptError(f"{path}: breast {key[0]} {key[1]} is listed as both {table[key]} and {value}")
    return table


def cell_text(value: object) -> str:
    return "" if value is None else str(value).strip()


def labelled_images(root: Path, table: dict[tuple[str, str], str]) -> tuple[list[tuple[str, str, str]], Counter]:
    """[(relative DICOM path, patient, class name)] for every image of a breast in ``table`` (sorted by path),
    and the count of images skipped per reason."""
    tree = root / "CMMD" if (root / "CMMD").is_dir() else root
    images, skipped = [], Counter()
    for path in sorted(p for p in tree.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file()):
        header = read_dataset(path, HEADER_TAGS)
        patient = cell_text(header.get("PatientID")) or path.relative_to(tree).parts[0]
        side = cell_text(header.get("ImageLaterality") or header.get("Laterality")).upper()
        if not side:
            skipped["no_laterality"] += 1
        elif (patient, side) not in table:
            skipped["breast_not_in_table"] += 1
        else:
            images.append((path.relative_to(root).as_posix(), patient, table[(patient, side)]))
    return images, skipped
