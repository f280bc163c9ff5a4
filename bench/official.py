"""A local re-implementation of how the official FPT+ code does extraction, storage and training-data loading,
written here from the paper (Sec. 3.5, "preloading") and the public code's published behaviour, not copied, so
that fpt can be measured against it on the same machine. Benchmarks only: nothing in fpt imports this module.

What the official approach does, and this module reproduces:

* **Extraction** ("preloading"): the LPM runs with eager attention in *every* block, so each block materialises
  its full attention probabilities ``[B, H, N, N]``; for each extracted layer the importance of a token is the
  mean of its probability column over all queries (``global``) or the class token's row (``cls``), and the top k
  tokens per head are kept.
* **Storage**: one ``.safetensors`` file per image holding ``key_states`` and ``value_states`` in fp32,
  ``[L, H, k, d]`` each, next to the untouched full-resolution image files.
* **Training data**: every step decodes the full-resolution image file, applies the side network's augmentation
  per image with torchvision on the PIL image (random resized crop, flips, colour jitter, then tensor +
  normalise), and loads that image's safetensors file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import transforms

from fpt.config import AugmentConfig
from fpt.extract.selection import num_selected


class OfficialExtractor(nn.Module):
    """A timm ViT switched to eager attention in every block, with top-k selection from the full probabilities.

    forward(images [B, 3, R, R]) -> dict: keys, values [B, L, H, k, d] (fp32); indices [B, L, H, k]
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], token_ratio: float, importance: str = "global"):
        super().__init__()
        self.model, self.layers = model, list(layers)
        self.token_ratio, self.importance = token_ratio, importance
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._selected: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for block in model.blocks:
            block.attn.fused_attn = False             # every block computes softmax(q k^T) explicitly
        for layer in self.layers:
            attn = model.blocks[layer].attn
            attn.qkv.register_forward_hook(self._grab_kv(layer, attn))
            attn.attn_drop.register_forward_hook(self._select(layer))   # its input is the probability tensor

    def _grab_kv(self, layer: int, attn: nn.Module):
        def hook(_module, _inputs, qkv: torch.Tensor):
            B, N, _ = qkv.shape                       # [B, N, 3*H*d] -> k, v [B, H, N, d]
            _, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            self._kv[layer] = (attn.k_norm(k), v)
        return hook

    def _select(self, layer: int):
        def hook(_module, _inputs, probs: torch.Tensor):
            """probs [B, H, N, N] -> top-k per head of the importance, and the K/V of those tokens."""
            n_keep = num_selected(probs.shape[-1], self.token_ratio)
            scores = probs.mean(dim=-2) if self.importance == "global" else probs[:, :, 0]    # [B, H, N]
            indices = scores.topk(n_keep, dim=-1).indices                                     # [B, H, k]
            k, v = self._kv.pop(layer)
            gather = indices.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            self._selected[layer] = (indices, k.gather(2, gather), v.gather(2, gather))
        return hook

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._selected.clear()
        self.model.forward_features(images)
        idx, keys, values = (torch.stack([self._selected[l][i] for l in self.layers], dim=1) for i in range(3))
        self._selected.clear()
        return {"keys": keys, "values": values, "indices": idx}


def save_per_image(out_dir: Path, names: Sequence[str], keys: torch.Tensor, values: torch.Tensor) -> list[Path]:
    """The official layout: ``<out_dir>/<name>.safetensors`` per image, ``key_states``/``value_states`` fp32
    ``[L, H, k, d]``. keys, values: [B, L, H, k, d]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = out_dir / f"{name}.safetensors"
        save_file({"key_states": keys[i].float().contiguous(), "value_states": values[i].float().contiguous()},
                  str(path))
        paths.append(path)
    return paths


def lpm_preprocess(res: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The official extraction input: resize to the LPM resolution, to tensor, normalise."""
    return transforms.Compose([transforms.Resize((res, res)), transforms.ToTensor(), transforms.Normalize(mean, std)])


def side_augmentation(side_res: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The side network's per-image training transform on the decoded full-resolution PIL image. The same
    settings as fpt's ``SideInput`` (the default ``AugmentConfig``, the paper's) so both sides do the same work."""
    a = AugmentConfig()
    return transforms.Compose([
        transforms.RandomResizedCrop(side_res, scale=a.scale, ratio=a.ratio),
        transforms.RandomHorizontalFlip(a.hflip), transforms.RandomVerticalFlip(a.vflip),
        transforms.ColorJitter(brightness=a.brightness, contrast=a.contrast, saturation=a.saturation),
        transforms.ToTensor(), transforms.Normalize(mean, std),
    ])


class OfficialTrainData:
    """Per-sample loading the official way: decode the image file, augment it, read its safetensors file."""

    def __init__(self, image_paths: Sequence[Path], labels: Sequence[int], kv_dir: Path, side_res: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.image_paths, self.labels, self.kv_dir = list(image_paths), list(labels), Path(kv_dir)
        self.transform = side_augmentation(side_res, mean, std)

    def __len__(self) -> int:
        return len(self.image_paths)

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(image [3, r, r], keys [L, H, k, d], values [L, H, k, d], label)."""
        path = self.image_paths[i]
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        states = load_file(str(self.kv_dir / f"{path.stem}.safetensors"))
        return self.transform(image), states["key_states"], states["value_states"], self.labels[i]

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled batches under fpt's batch keys: images float32 [B, 3, r, r] (augmented and normalised
        already), keys/values float32 [B, L, H, k, d], labels int64 [B]."""
        order = rng.permutation(len(self))
        for start in range(0, len(order), batch_size):
            images, keys, values, labels = zip(*(self.sample(int(i)) for i in order[start:start + batch_size]))
            yield {"images": torch.stack(images), "keys": torch.stack(keys), "values": torch.stack(values),
                   "labels": torch.tensor(labels, dtype=torch.int64)}
