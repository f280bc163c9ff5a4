"""Where samples come from: an ImageFolder tree or the generated demo task. Each source lists SampleRefs up front
(ids, labels, splits are known before any image is decoded) and decodes one image on request."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fpt import FptError
from fpt.config import ExtractConfig

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


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

    def __init__(self, root: Path, classes: list[str] | None = None):
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
        path = self.root / ref.id
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
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
    if cfg.source == "synthetic":
        return SyntheticTextureSource(cfg.counts or {"train": 240, "val": 80, "test": 80}, cfg.res, cfg.seed,
                                      cfg.classes)
    if cfg.data is None or not Path(cfg.data).is_dir():
        raise FptError(f"--data {cfg.data}: expected a folder {{train,val,test}}/<class>/<image>")
    return ImageFolderSource(cfg.data, cfg.classes)


def prepare_image(image: Image.Image, res: int, image_res: int) -> tuple[np.ndarray, np.ndarray]:
    """The LPM's input and the stored low-res copy, from an RGB or a float grey ("F", [0, 1]) image.

    Returns (high float32 [res, res, 3] in [0, 255], low uint8 [image_res, image_res, 3]). The high-res image is
    resized with (antialiased) bicubic; the low-res copy is an area average of it, the standard for downscaling.
    A float image stays float until here, so 16-bit sources keep their precision through the resize.
    """
    if image.mode not in ("RGB", "F"):
        image = to_rgb(image)
    high = image if image.size == (res, res) else image.resize((res, res), Image.Resampling.BICUBIC)
    low = high.resize((image_res, image_res), Image.Resampling.BOX if image_res <= res else Image.Resampling.BICUBIC)
    high_a, low_a = np.asarray(high, dtype=np.float32), np.asarray(low, dtype=np.float32)
    if image.mode == "F":
        high_a, low_a = np.repeat(high_a[..., None] * 255, 3, -1), np.repeat(low_a[..., None] * 255, 3, -1)
    return high_a, np.clip(low_a, 0, 255).round().astype(np.uint8)
