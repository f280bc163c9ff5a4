"""Benchmark inputs: synthetic images (the demo's fine-grained texture task) as tensors, and a cached data set
extracted both ways (our Zarr store and the official per-image safetensors files) for figures 2-4."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fpt.bench.common import WORK_DIR
from fpt.config import extract_config, pipeline_entry
from fpt.extract.datasets import synthetic_texture_image
from fpt.extract.images import prepare_image

DEFAULTS = pipeline_entry(None)           # default layers/token ratio, train settings
DEMO = pipeline_entry("demo")             # the synthetic task's fixed mean/std (the defaults' are "auto")
SPLIT_SIZES = {"val": 2, "test": 2}
CLASSES = ("plain", "textured")


def synthetic_inputs(n: int, res: int, image_res: int = 256, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """n demo images -> (normalised LPM input float32 [n, 3, res, res], low-res copies uint8 [n, R, R, 3]),
    prepared exactly as ``fpt extract`` prepares them."""
    mean = torch.tensor(DEMO["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(DEMO["std"]).view(1, 3, 1, 1) * 255
    highs, lows = zip(*(prepare_image(Image.fromarray(synthetic_texture_image(res, i % 2, [seed, i])), res,
                                      image_res) for i in range(n)))
    x = torch.from_numpy(np.stack(highs)).permute(0, 3, 1, 2)
    return ((x - mean) / std).contiguous(), np.stack(lows)


@dataclass
class BenchData:
    tree: Path            # ImageFolder tree of full-resolution PNGs: {train,val,test}/<class>/<split>_<i>.png
    store: Path           # our store, written by fpt.extract.run.extract
    official: Path        # one fp32 safetensors file per image, written by OfficialExtractor
    model: str
    res: int

    def train_images(self, png_res: int | None = None) -> tuple[list[Path], list[int]]:
        """The train split's image files and labels; with ``png_res``, copies of the same images (same names and
        draws) generated at that side, for the official loader (originals larger than the LPM input)."""
        tree = self.tree if png_res is None else larger_originals(self, png_res)
        paths = sorted((tree / "train").rglob("*.png"))
        return paths, [CLASSES.index(p.parent.name) for p in paths]


def _write_png(path: Path, png_res: int, label: int, seed: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_texture_image(png_res, label, seed)).save(path)


def _write_tree(tree: Path, png_res: int, counts: dict[str, int]) -> None:
    """The demo task as PNG files ``tree/<split>/<class>/<split>_<i>.png`` at ``png_res`` px (on half the cores:
    a GPU machine's bench would otherwise spend minutes of its lease encoding PNGs on one)."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(tree / split / CLASSES[i % 2] / f"{split}_{i:04d}.png", png_res, i % 2, [1, s, i])
            for s, (split, n) in enumerate(counts.items()) for i in range(n)]
    with ProcessPoolExecutor(max(1, min(8, (os.cpu_count() or 2) // 2))) as pool:
        list(pool.map(_write_png, *zip(*jobs)))


def larger_originals(data: "BenchData", png_res: int) -> Path:
    """A copy of ``data``'s train split as ``png_res`` px PNG files (cached next to the data set)."""
    tree = data.tree.with_name(f"images-png{png_res}")
    if not (tree / "done").exists():
        _write_tree(tree, png_res, {"train": len(list((data.tree / "train").rglob("*.png")))})
        (tree / "done").touch()
    return tree


def ensure_images(model: str = "vit_base_patch16_224", res: int = 512, n_train: int = 32,
                  png_res: int | None = None) -> BenchData:
    """The demo task as PNG files at ``png_res`` (default: the LPM res) for ``ensure_dataset`` (cached under
    bench/.work/); a GPU lease writes them while its CUDA tests run."""
    root = WORK_DIR / f"{model}-{res}-{n_train}-png{png_res or res}"
    data = BenchData(root / "images", root / "ours.zarr", root / "official", model, res)
    if not (root / "images.done").exists():
        _write_tree(data.tree, png_res or res, {"train": n_train, **SPLIT_SIZES})
        (root / "images.done").touch()
    return data


def ensure_dataset(model: str = "vit_base_patch16_224", res: int = 512, n_train: int = 32, image_res: int = 256,
                   png_res: int | None = None) -> BenchData:
    """Build (once, cached under bench/.work/) the demo task as PNG files (``ensure_images``) and extract it with
    fpt (store) and with the official approach (safetensors), same backbone and weights, on the GPU when there is
    one."""
    data = ensure_images(model, res, n_train, png_res)
    root = data.tree.parent
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = 16 if device == "cuda" else 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not (root / "ours.done").exists():
            from fpt.extract.run import extract
            extract(extract_config(None, data.tree, backbone=model, random_init=True, res=res, image_res=image_res,
                                   out=data.store, device=device, batch_size=batch_size, overwrite=True,
                                   mean=DEMO["mean"], std=DEMO["std"]))
            (root / "ours.done").touch()
        if not (root / "official.done").exists():
            extract_official(data, DEFAULTS["extract"]["token_ratio"], batch_size, device)
            (root / "official.done").touch()
    return data


def extract_official(data: BenchData, token_ratio: float, batch_size: int = 2, device: str = "cpu") -> None:
    """The official preloading pass over every image of the tree (torchvision preprocessing, eager fp32 LPM)."""
    from fpt.bench.official import OfficialExtractor, lpm_preprocess, save_per_image
    from fpt.extract.backbone import create_backbone
    from fpt.extract.run import default_layers

    net, info = create_backbone(data.model, data.res, random_init=True)
    extractor = OfficialExtractor(net, default_layers(info.depth), token_ratio).to(device)
    preprocess = lpm_preprocess(data.res, DEMO["mean"], DEMO["std"])
    paths = sorted(data.tree.rglob("*.png"))
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in chunk])
        out = extractor(x.to(device))
        save_per_image(data.official, [p.stem for p in chunk], out["keys"].cpu(), out["values"].cpu())
