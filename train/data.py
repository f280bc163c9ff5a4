"""Batches for the side network: K/V and low-res images from fpt.store, augmented on the training device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import psutil
import torch
from torchvision.transforms import v2

from fpt.store import StoreReader


@dataclass
class Batch:
    images: torch.Tensor    # uint8 [B, 3, R, R] (stored low-res copy)
    keys: torch.Tensor      # float16 [B, L, H, k, d]
    values: torch.Tensor    # float16 [B, L, H, k, d]
    labels: torch.Tensor    # int64 [B]


class SplitData:
    """One split of a store. Cached in RAM when it fits ``cache`` (auto: a quarter of available memory),
    otherwise read batch by batch from the store."""

    def __init__(self, reader: StoreReader, split: str, with_kv: bool = True, cache: str = "auto"):
        self.reader, self.split = reader, split
        self.indices = reader.split_indices(split)
        self.names = ("keys", "values", "images") if with_kv else ("images",)
        sample_shapes = reader.geometry.sample_shapes()
        need = len(self.indices) * sum(int(np.prod(sample_shapes[n][0])) * np.dtype(sample_shapes[n][1]).itemsize
                                       for n in self.names)
        self.cached = cache == "ram" or (cache == "auto" and need < psutil.virtual_memory().available / 4)
        self._ram = reader.read(self.indices, self.names) if self.cached else None

    def __len__(self) -> int:
        return len(self.indices)

    def _rows(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        if self._ram is not None:
            return {name: arr[positions] for name, arr in self._ram.items()}
        return self.reader.read(self.indices[positions], self.names)

    def batches(self, batch_size: int, shuffle: bool = False, rng: np.random.Generator | None = None,
                device: torch.device = torch.device("cpu")) -> Iterator[Batch]:
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            rows = self._rows(order[start:start + batch_size])
            kv = {n: torch.from_numpy(rows[n]).to(device) if n in rows else None for n in ("keys", "values")}
            yield Batch(images=torch.from_numpy(rows["images"]).to(device).permute(0, 3, 1, 2),
                        keys=kv["keys"], values=kv["values"], labels=torch.from_numpy(rows["labels"]).to(device))


class SideInput:
    """uint8 low-res images -> normalised float side-network input [B, 3, r, r].

    Training: random resized crop, horizontal and vertical flips and colour jitter, drawn per image (the
    paper's cropping, flipping and colour distortion); evaluation: resize only.
    """

    def __init__(self, side_res: int, mean, std):
        self.side_res = side_res
        self.train_tf = v2.Compose([
            v2.RandomResizedCrop(side_res, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1),
        ])
        self.eval_tf = v2.Resize(side_res, antialias=True)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if train:
            images = torch.stack([self.train_tf(img) for img in images])
        elif images.shape[-1] != self.side_res:
            images = self.eval_tf(images)
        x = images.float() / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
