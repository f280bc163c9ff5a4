"""Where samples come from: an ImageFolder tree, a CSV manifest, the CMMD collection (fpt.extract.cmmd) or the
generated demo task. Each source lists SampleRefs up front (ids, labels, splits are known before any image is
decoded) and decodes one image on request."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from fpt import FptError
from fpt.config import ExtractConfig
from fpt.extract.cmmd import CmmdSource
from fpt.extract.images import IMAGE_EXTENSIONS, FileDecoding, lpm_view, rgb_array
from fpt.extract.samples import (ImageSource, SampleRef, check_distinct_classes, check_each_image_once,
                                 check_files_exist, check_splits_filled, class_names, parse_split_names,
                                 stratified_group_split, unreadable_source_error)
from fpt.store import SPLITS


class ImageFolderSource:
    """``root/{train,val,test}/<class>/<image>``: the layout of the official FPT code."""

    def __init__(self, root: Path, classes: list[str] | None = None, decoding: FileDecoding = FileDecoding()):
        self.decoding = decoding
        self.root = Path(root)
        self.name = self.root.name
        for split in SPLITS:
            if not (self.root / split).is_dir():
                raise FptError(f"{self.root} has no {split}/ folder; "
                               f"expected {self.root}/{{train,val,test}}/<class>/<image>")
        found = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir() and not hidden(d.name))
        check_distinct_classes(found, str(self.root / "train"))
        if classes is not None and sorted(classes) != found:
            raise FptError(f"{self.root / 'train'} has classes {found}, the pipeline expects {sorted(classes)}")
        self.classes = list(classes) if classes is not None else found   # the pipeline fixes the label order
        self.samples = []
        for s, split in enumerate(SPLITS):
            files = []
            for class_dir in sorted(p for p in (self.root / split).iterdir() if p.is_dir() and not hidden(p.name)):
                if class_dir.name not in self.classes:
                    raise FptError(f"{class_dir}: class {class_dir.name!r} is not among the train classes "
                                   f"{self.classes}")
                files += [(f, self.classes.index(class_dir.name)) for f in sorted(class_dir.rglob("*"))
                          if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                          and not any(hidden(part) for part in f.relative_to(class_dir).parts)]
            self.samples += [SampleRef(f.relative_to(self.root).as_posix(), label, s) for f, label in files]
        check_each_image_once(((ref.id, self.root / ref.id) for ref in self.samples), str(self.root))
        check_splits_filled(self.samples, str(self.root))

    def load(self, ref: SampleRef) -> Image.Image:
        return self.decoding.load(self.root / ref.id)


def hidden(name: str) -> bool:
    """A hidden file or folder (``.ipynb_checkpoints``, ``.DS_Store``): never a class or a sample."""
    return name.startswith(".")


class CsvManifestSource:
    """A CSV manifest with columns ``path,label[,split][,group]``; paths are relative to the CSV's folder.

    Labels are class names (sorted, unless the pipeline fixes the order). Without a split column the samples get
    the seeded stratified 70/10/20 split, with every ``group`` (e.g. patient) kept inside one split.
    """

    def __init__(self, csv_path: Path, classes: list[str] | None = None, seed: int = 0,
                 decoding: FileDecoding = FileDecoding()):
        self.decoding = decoding
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
        return self.decoding.load(self.root / ref.id)


MANIFEST_COLUMNS = ("path", "label")
# --std auto below this (a fortieth of one 8-bit level, on the [0, 1] scale): train images of one colour, nearly;
# normalising by such a std would blow their pixels up past what fp16 holds
NO_VARIATION_STD = 1e-4


def read_manifest(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a manifest as dicts of stripped strings, keyed by lower-case column name."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            twice = sorted({c for c in columns if columns.count(c) > 1 and c})
            if twice:
                raise FptError(f"{csv_path}: column(s) {', '.join(twice)} appear more than once (column names are "
                               f"read without case and spaces); found {','.join(columns)}")
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
    check_each_image_once(((f"line {line} ({row['path']!r})", csv_path.parent / row["path"].replace("\\", "/"))
                           for line, row in enumerate(rows, start=2)), str(csv_path))
    if not rows:
        raise FptError(f"{csv_path}: the manifest has no rows")
    return rows


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
        check_splits_filled(self.samples, "the synthetic data set")

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
        return CmmdSource(cfg.data, cfg.classes, cfg.seed, file_decoding(cfg))
    if cfg.data is not None and Path(cfg.data).is_file() and Path(cfg.data).suffix.lower() == ".csv":
        return CsvManifestSource(cfg.data, cfg.classes, cfg.seed, file_decoding(cfg))
    if cfg.data is None or not Path(cfg.data).is_dir():
        raise FptError(f"--data {cfg.data}: expected a folder {{train,val,test}}/<class>/<image> "
                       "or a CSV manifest path,label[,split][,group]")
    return ImageFolderSource(cfg.data, cfg.classes, file_decoding(cfg))


def file_decoding(cfg: ExtractConfig) -> FileDecoding:
    return FileDecoding(cfg.res, reduced_j2k=cfg.j2k_decode == "reduced")


def compute_mean_std(source: ImageSource, res: int, skip_unreadable: bool = False
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of every pixel of the train split, as the LPM sees it: resized to ``res``, values
    in [0, 1]. One pass, accumulating sums of x and x^2 in float64 (the official FPT code's ``auto``), of x less
    the first image's mean, so that train images of one colour give a std of ~0 rather than rounding error.
    Unreadable images are left out with ``skip_unreadable`` (``--on-error skip``), else refused."""
    total, total_sq, n, shift = np.zeros(3), np.zeros(3), 0, None
    for ref in source.samples:
        if ref.split == SPLITS.index("train"):
            try:
                image = source.load(ref)
            except FptError as e:
                if skip_unreadable:
                    continue
                raise unreadable_source_error(str(e)) from None
            x = rgb_array(lpm_view(image, res)).astype(np.float64) / 255    # [res, res, 3]
            shift = x.mean(axis=(0, 1)) if shift is None else shift
            x -= shift
            total += x.sum(axis=(0, 1))
            total_sq += np.square(x).sum(axis=(0, 1))
            n += x.shape[0] * x.shape[1]
    if n == 0:
        raise FptError("--mean/--std auto: the train split has no images")
    shifted_mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - np.square(shifted_mean), 0.0))
    return tuple(float(m) for m in shift + shifted_mean), tuple(float(s) for s in std)


def resolve_normalization(cfg: ExtractConfig, source: ImageSource) -> ExtractConfig:
    """``cfg`` with a mean/std of "auto" replaced by the train split's statistics (``compute_mean_std``)."""
    if cfg.mean != "auto" and cfg.std != "auto":
        return cfg
    mean, std = compute_mean_std(source, cfg.res, skip_unreadable=cfg.on_error == "skip")
    if cfg.std == "auto" and min(std) < NO_VARIATION_STD:
        raise FptError(f"--std auto: the train images have no variation (std {std}); give --std R,G,B")
    return replace(cfg, mean=mean if cfg.mean == "auto" else cfg.mean, std=std if cfg.std == "auto" else cfg.std)


