"""Where samples come from: an ImageFolder tree, a CSV manifest, the CMMD collection (fpt.extract.cmmd) or the
generated demo task. Each source lists SampleRefs up front (ids, labels, splits are known before any image is
decoded) and decodes one image on request."""
from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fpt import FptError
from fpt.config import ExtractConfig
from fpt.extract.dicom import read_dicom

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}
SPLIT_FOLDS = 10    # the paper's 70/10/20 rule as ten stratified folds: 7 train, 1 val, 2 test


@dataclass(frozen=True)
class SampleRef:
    id: str        # relative path (or generated id)
    label: int     # index into the source's classes
    split: int     # index into SPLITS


class ImageSource(Protocol):
    name: str
    classes: list[str]
    samples: list[SampleRef]

    def load(self, ref: SampleRef) -> Image.Image: ...


class ImageFolderSource:
    """``root/{train,val,test}/<class>/<image>``: the layout of the official FPT code."""

    def __init__(self, root: Path, classes: list[str] | None = None, size_hint: int | None = None):
        self.size_hint = size_hint
        self.root = Path(root)
        self.name = self.root.name
        for split in SPLITS:
            if not (self.root / split).is_dir():
                raise FptError(f"{self.root} has no {split}/ folder; expected {self.root}/{{train,val,test}}/<class>/<image>")
        found = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        if classes is not None and sorted(classes) != found:
            raise FptError(f"{self.root / 'train'} has classes {found}, the pipeline expects {sorted(classes)}")
        self.classes = list(classes) if classes is not None else found   # the pipeline fixes the label order
        self.samples = []
        for s, split in enumerate(SPLITS):
            files = []
            for class_dir in sorted(p for p in (self.root / split).iterdir() if p.is_dir()):
                if class_dir.name not in self.classes:
                    raise FptError(f"{class_dir}: class {class_dir.name!r} is not among the train classes {self.classes}")
                files += [(f, self.classes.index(class_dir.name)) for f in sorted(class_dir.rglob("*"))
                          if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
            if not files:
                raise FptError(f"the {split} split in {self.root / split} has no images")
            self.samples += [SampleRef(f.relative_to(self.root).as_posix(), label, s) for f, label in files]

    def load(self, ref: SampleRef) -> Image.Image:
        return load_image_file(self.root / ref.id, self.size_hint)


class CsvManifestSource:
    """A CSV manifest with columns ``path,label[,split][,group]``; paths are relative to the CSV's folder.

    Labels are class names (sorted, unless the pipeline fixes the order). Without a split column the samples get
    the seeded stratified 70/10/20 split, with every ``group`` (e.g. patient) kept inside one split.
    """

    def __init__(self, csv_path: Path, classes: list[str] | None = None, seed: int = 0,
                 size_hint: int | None = None):
        self.size_hint = size_hint
        self.csv_path = Path(csv_path)
        self.root, self.name = self.csv_path.parent, self.csv_path.stem
        rows = read_manifest(self.csv_path)
        self.classes = class_names([r["label"] for r in rows], classes, str(self.csv_path))
        labels = [self.classes.index(r["label"]) for r in rows]
        check_files_exist([r["path"] for r in rows], self.root, str(self.csv_path))
        if "split" in rows[0]:
            splits = parse_split_names([r["split"] for r in rows], str(self.csv_path))
        else:
            groups = [r.get("group") or r["path"] for r in rows]   # no group: each image its own
            splits = stratified_group_split(labels, groups, seed, f"{self.csv_path} (no split column)")
        self.samples = [SampleRef(r["path"], label, int(s)) for r, label, s in zip(rows, labels, splits)]
        check_splits_filled(self.samples, str(self.csv_path))

    def load(self, ref: SampleRef) -> Image.Image:
        return load_image_file(self.root / ref.id, self.size_hint)


MANIFEST_COLUMNS = ("path", "label")


def read_manifest(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a manifest as dicts of stripped strings, keyed by lower-case column name."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            missing = [c for c in MANIFEST_COLUMNS if c not in columns]
            if missing:
                raise FptError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected "
                               f"path,label[,split][,group], found {','.join(columns) or 'nothing'}")
            rows = [{c: (v or "").strip() for c, v in zip(columns, row.values())} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FptError(f"cannot read manifest {csv_path}: {e}") from None
    for line, row in enumerate(rows, start=2):
        if not row["path"] or not row["label"]:
            raise FptError(f"{csv_path}, line {line}: empty path or label")
    if not rows:
        raise FptError(f"{csv_path}: the manifest has no rows")
    return rows


def class_names(labels: Sequence[str], fixed: list[str] | None, what: str) -> list[str]:
    """The class list: ``fixed`` (the pipeline's order) when given, else the sorted distinct ``labels``."""
    if fixed is None:
        return sorted(set(labels))
    unknown = sorted(set(labels) - set(fixed))
    if unknown:
        raise FptError(f"{what}: label(s) {', '.join(map(repr, unknown[:5]))} are not among the pipeline's "
                       f"classes {fixed}")
    return list(fixed)


def check_files_exist(paths: Sequence[str], root: Path, what: str) -> None:
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise FptError(f"{what}: {len(missing)} of {len(paths)} image files are missing (relative to {root}), "
                       f"e.g. {', '.join(missing[:3])}")


def parse_split_names(names: Sequence[str], what: str) -> list[int]:
    """``train``/``val``/``test`` (any case) -> split indices."""
    unknown = sorted({n for n in names if n.lower() not in SPLITS})
    if unknown:
        raise FptError(f"{what}: unknown split name(s) {', '.join(map(repr, unknown[:5]))}; use train, val or test")
    return [SPLITS.index(n.lower()) for n in names]


def stratified_group_split(labels: Sequence[int], groups: Sequence[str], seed: int, what: str) -> np.ndarray:
    """The paper's rule for datasets without an official split: seeded, stratified 70/10/20 train/val/test.

    labels, groups: [n]; every group (patient) lands in one split. Returns uint8 [n] indices into SPLITS.
    scikit-learn's StratifiedGroupKFold (shuffled by ``seed``) makes ten folds: 0-6 train, 7 val, 8-9 test.
    The same inputs in the same order always give the same split.
    """
    from sklearn.model_selection import StratifiedGroupKFold   # ~2 s to import: only when a split is made

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups, smallest = len(np.unique(groups)), int(np.unique(labels, return_counts=True)[1].min())
    if n_groups < SPLIT_FOLDS or smallest < SPLIT_FOLDS:
        raise FptError(f"{what}: a stratified 70/10/20 split needs at least {SPLIT_FOLDS} groups and "
                       f"{SPLIT_FOLDS} samples of every class; found {n_groups} groups and {smallest} samples "
                       "in the smallest class")
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=SPLIT_FOLDS, shuffle=True, random_state=seed)
    for fold, (_, members) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[members] = fold
    return np.digitize(folds, [7, 8]).astype(np.uint8)


def check_splits_filled(samples: Sequence[SampleRef], what: str) -> None:
    present = {s.split for s in samples}
    for s, split in enumerate(SPLITS):
        if s not in present:
            raise FptError(f"{what}: the {split} split is empty")


# Scanner exports are large (a 20k x 20k pathology or mammography export is 400 M pixels); PIL's default bomb
# guard (~179 M pixels) would refuse them. Above this, a file is refused as implausible.
Image.MAX_IMAGE_PIXELS = 1_000_000_000


def load_image_file(path: Path, size_hint: int | None = None) -> Image.Image:
    """An image file (PNG, JPEG, TIFF, ... or DICOM) as ``to_rgb`` gives it, EXIF orientation applied;
    unreadable -> FptError naming the file. ``size_hint`` (the LPM side) lets JPEG decode at a reduced scale
    that still covers it, so huge JPEGs cost little memory."""
    if path.suffix.lower() == ".dcm":
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            if size_hint and im.format == "JPEG":
                im.draft(im.mode, (size_hint, size_hint))
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FptError(f"cannot read image {path}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """An image ``prepare_image`` accepts: 8-bit RGB, or for high-bit-depth grey (16-bit PNG/TIFF) a float
    image (mode "F", values in [0, 1], scaled by its own range) so precision is kept until the final resize."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return grey_float(np.asarray(im, dtype=np.float64))
    return im.convert("RGB")


def grey_float(a: np.ndarray) -> Image.Image:
    """float grey [H, W] of any range -> PIL "F" image in [0, 1] (min-max scaled)."""
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return Image.fromarray(a.astype(np.float32), mode="F")


class SyntheticTextureSource:
    """The demo's fine-grained task, generated deterministically from a seed.

    Every image is a smooth grey background with one bright "lesion" blob. In class 1 the blob carries a
    pixel-level checkerboard; in class 0 it does not. The checkerboard is fully visible to the LPM at ``res``
    and averages out exactly under a 2x2 area downsample, so a side network that only sees the low-res copy
    cannot tell the classes apart, while one reading the LPM's K/V can.
    """

    def __init__(self, counts: dict[str, int], res: int, seed: int = 0, classes: list[str] | None = None):
        self.name = "demo"
        self.classes = list(classes or ["plain", "textured"])
        self.res, self.seed = res, seed
        self.samples = [SampleRef(f"synthetic/{split}/{i:05d}", i % 2, s)
                        for s, split in enumerate(SPLITS) for i in range(int(counts[split]))]
        for s, split in enumerate(SPLITS):
            if not any(r.split == s for r in self.samples):
                raise FptError(f"the synthetic {split} split is empty")

    def load(self, ref: SampleRef) -> Image.Image:
        index = int(ref.id.rsplit("/", 1)[1])
        return Image.fromarray(synthetic_texture_image(self.res, ref.label, [self.seed, ref.split, index]))


def synthetic_texture_image(res: int, label: int, seed) -> np.ndarray:
    """uint8 [res, res, 3]; see SyntheticTextureSource."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.uniform(0.35, 0.65, (6, 6)).astype(np.float32), mode="F")
    img = np.asarray(coarse.resize((res, res), Image.Resampling.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[:res, :res]
    cy, cx = rng.uniform(0.3, 0.7, 2) * res
    radius = rng.uniform(0.14, 0.22) * res
    blob = np.clip((radius - np.hypot(yy - cy, xx - cx)) / 3.0, 0, 1)    # soft-edged disk
    img += 0.15 * blob
    if label == 1:
        img += 0.12 * blob * np.where((yy + xx) % 2 == 0, 1.0, -1.0)
    img += rng.normal(0, 0.01, img.shape)
    grey = np.clip(img * 255, 0, 255).round().astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def open_source(cfg: ExtractConfig) -> ImageSource:
    """The source ``cfg`` names: synthetic or cmmd (pipeline ``source``), else by ``--data``: a .csv manifest
    or an ImageFolder tree."""
    if cfg.source == "synthetic":
        return SyntheticTextureSource(cfg.counts or {"train": 240, "val": 80, "test": 80}, cfg.res, cfg.seed,
                                      cfg.classes)
    if cfg.source == "cmmd":
        from fpt.extract.cmmd import CmmdSource    # it imports this module (and openpyxl)
        return CmmdSource(cfg.data, cfg.classes, cfg.seed)
    if cfg.data is not None and Path(cfg.data).is_file() and Path(cfg.data).suffix.lower() == ".csv":
        return CsvManifestSource(cfg.data, cfg.classes, cfg.seed, size_hint=cfg.res)
    if cfg.data is None or not Path(cfg.data).is_dir():
        raise FptError(f"--data {cfg.data}: expected a folder {{train,val,test}}/<class>/<image> "
                       "or a CSV manifest path,label[,split][,group]")
    return ImageFolderSource(cfg.data, cfg.classes, size_hint=cfg.res)


def compute_mean_std(source: ImageSource, res: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of every pixel of the train split, as the LPM sees it: resized to ``res``, values
    in [0, 1]. One pass, accumulating sums of x and x^2 in float64 (the official FPT code's ``auto``)."""
    total, total_sq, n = np.zeros(3), np.zeros(3), 0
    for ref in source.samples:
        if ref.split == SPLITS.index("train"):
            x = rgb_array(lpm_view(source.load(ref), res)).astype(np.float64) / 255    # [res, res, 3]
            total += x.sum(axis=(0, 1))
            total_sq += np.square(x).sum(axis=(0, 1))
            n += x.shape[0] * x.shape[1]
    if n == 0:
        raise FptError("--mean/--std auto: the train split has no images")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def resolve_normalization(cfg: ExtractConfig, source: ImageSource) -> ExtractConfig:
    """``cfg`` with a mean/std of "auto" replaced by the train split's statistics (``compute_mean_std``)."""
    if cfg.mean != "auto" and cfg.std != "auto":
        return cfg
    mean, std = compute_mean_std(source, cfg.res)
    if cfg.std == "auto" and min(std) == 0:
        raise FptError(f"--std auto: the train images have no variation (std {std}); give --std R,G,B")
    return replace(cfg, mean=mean if cfg.mean == "auto" else cfg.mean, std=std if cfg.std == "auto" else cfg.std)


def prepare_image(image: Image.Image, res: int, image_res: int) -> tuple[np.ndarray, np.ndarray]:
    """The LPM's input and the stored low-res copy, from an RGB or a float grey ("F", [0, 1]) image.

    Returns (high float32 [res, res, 3] in [0, 255], low uint8 [image_res, image_res, 3]). The high-res image is
    resized with (antialiased) bicubic; the low-res copy is an area average of it, the standard for downscaling.
    A float image stays float until here, so 16-bit sources keep their precision through the resize.
    """
    high = lpm_view(image, res)
    low = high.resize((image_res, image_res), Image.Resampling.BOX if image_res <= res else Image.Resampling.BICUBIC)
    return rgb_array(high), np.clip(rgb_array(low), 0, 255).round().astype(np.uint8)


def lpm_view(image: Image.Image, res: int) -> Image.Image:
    """The image as the LPM sees it: RGB or float grey ("F"), resized to [res, res] with bicubic."""
    if image.mode not in ("RGB", "F"):
        image = to_rgb(image)
    return image if image.size == (res, res) else image.resize((res, res), Image.Resampling.BICUBIC)


def rgb_array(image: Image.Image) -> np.ndarray:
    """float32 [H, W, 3] in [0, 255] from an RGB or a float grey ("F", [0, 1]) image."""
    a = np.asarray(image, dtype=np.float32)
    return np.repeat(a[..., None] * 255, 3, -1) if image.mode == "F" else a
