"""Shared fixtures: a tiny registered timm ViT, small image trees, a small extracted store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.models import register_model
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from fpt.config import extract_config

MICRO = "fpt_test_vit_micro_patch8"


@register_model
def fpt_test_vit_micro_patch8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 4-layer, 2-head, width-32 ViT with 8 px patches: the LPM of most tests."""
    kwargs = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, **kwargs}
    return build_model_with_cfg(VisionTransformer, MICRO, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def write_image_folder(root: Path, per_class: dict[str, int] | None = None, size: int = 40, seed: int = 0,
                       classes=("benign", "malignant")) -> Path:
    """root/{train,val,test}/<class>/<i>.png with random RGB images (class 1 brighter)."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 4, "val": 2, "test": 2}
    for split, n in per_class.items():
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 200, (size, size + 3, 3)) + 40 * c
                Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data")


def micro_config(data: Path, out: Path, **overrides):
    options = dict(backbone=MICRO, random_init=True, res=64, image_res=32, batch_size=3, device="cpu",
                   samples_per_shard=4)
    options.update(overrides)
    return extract_config(None, data, out=out, **options)


@pytest.fixture
def micro_store(tmp_path: Path, image_folder: Path) -> Path:
    from fpt.extract import extract

    out = tmp_path / "micro.zarr"
    extract(micro_config(image_folder, out))
    return out

