"""``fpt extract``: samples -> frozen LPM -> top-k K/V -> store, one whole shard at a time."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fpt import FptError
from fpt.config import ExtractConfig
from fpt.extract.backbone import FrozenLPM, create_backbone
from fpt.extract.datasets import SPLITS, ImageSource, open_source, prepare_image
from fpt.store import Geometry, StoreWriter, choose_samples_per_shard


@dataclass
class ExtractResult:
    path: str
    n_samples: int
    n_written: int          # samples extracted by this run (0 when the store was already complete)
    seconds: float
    images_per_s: float
    peak_memory_mb: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FptError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def default_layers(depth: int) -> list[int]:
    """The last half of the LPM (6-11 for a 12-layer ViT-B), as in the paper."""
    return list(range(depth // 2, depth))


def extract(cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Run the frozen LPM over every sample not yet in the store at ``cfg.out`` and write its shards.

    ``progress(done, total)`` is called after every batch. Re-running on a complete store does nothing.
    """
    source = open_source(cfg)
    device = resolve_device(cfg.device)
    model, info = create_backbone(cfg.backbone, cfg.res, cfg.weights, cfg.random_init)
    layers = cfg.layers or default_layers(info.depth)
    if min(layers) < 0 or max(layers) >= info.depth:
        raise FptError(f"--layers {layers}: {cfg.backbone} has layers 0-{info.depth - 1}")
    lpm = FrozenLPM(model, layers, cfg.token_ratio, cfg.importance, cfg.query_block).to(device)
    k = lpm.n_selected(cfg.res)

    samples = source.samples
    geometry = Geometry(n_samples=len(samples), layers=len(layers), heads=info.heads, k=k,
                        head_dim=info.head_dim, embed_dim=info.embed_dim, image_res=cfg.image_res)
    geometry = Geometry(**{**geometry.__dict__, "samples_per_shard":
                           cfg.samples_per_shard or choose_samples_per_shard(geometry.bytes_per_sample())})
    writer = StoreWriter.open(
        cfg.out, geometry, store_attrs(cfg, source, info.as_attrs(), layers, k),
        ids=np.array([s.id for s in samples], dtype=object),
        labels=np.array([s.label for s in samples]), split=np.array([s.split for s in samples]),
        overwrite=cfg.overwrite)
    geometry = writer.geometry
    pending = writer.pending_shards()
    total = sum(len(geometry.shard_range(s)) for s in pending)
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start, written = time.perf_counter(), 0
    for shard in pending:
        rows = geometry.shard_range(shard)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in ("keys", "values", "indices", "cls", "images")}
        for batch_start in range(rows.start, rows.stop, cfg.batch_size):
            batch = samples[batch_start:min(batch_start + cfg.batch_size, rows.stop)]
            out, low = run_batch(lpm, source, batch, cfg, mean, std, device)
            for name in ("keys", "values", "cls"):
                parts[name].append(out[name].to(torch.float16).cpu().numpy())
            parts["indices"].append(out["indices"].to(torch.int32).cpu().numpy())
            parts["images"].append(low)
            written += len(batch)
            if progress:
                progress(written, total)
        writer.write_shard(shard, {name: np.concatenate(v) for name, v in parts.items()})
    seconds = time.perf_counter() - start
    result = ExtractResult(str(cfg.out), len(samples), written, seconds,
                           written / seconds if written and seconds > 0 else 0.0, peak_memory_mb(device))
    if written:
        writer.update_attrs(last_run={"images_per_s": round(result.images_per_s, 3), "seconds": round(seconds, 3),
                                      "samples": written, "device": str(device),
                                      "peak_memory_mb": round(result.peak_memory_mb, 1)})
    return result


def run_batch(lpm: FrozenLPM, source: ImageSource, batch, cfg: ExtractConfig, mean, std, device):
    """Decode, resize and normalise one batch, run the LPM. Returns (LPM outputs, low-res uint8 [B, R, R, 3])."""
    highs, lows = zip(*(prepare_image(source.load(ref), cfg.res, cfg.image_res) for ref in batch))
    x = torch.from_numpy(np.stack(highs)).to(device).permute(0, 3, 1, 2)
    x = (x - mean) / std
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = lpm(x)
    return out, np.stack(lows)


def store_attrs(cfg: ExtractConfig, source: ImageSource, backbone: dict, layers: list[int], k: int) -> dict:
    counts = Counter((s.split, s.label) for s in source.samples)
    return {
        "backbone": backbone,
        "extraction": {"res": cfg.res, "layers": layers, "token_ratio": cfg.token_ratio, "k": k,
                       "importance": cfg.importance, "dtype": "float16", "image_res": cfg.image_res},
        "dataset": {"name": cfg.name, "classes": source.classes, "source": str(cfg.data or cfg.source),
                    "counts": {split: {c: counts[(i, j)] for j, c in enumerate(source.classes)}
                               for i, split in enumerate(SPLITS)}},
        "normalization": {"mean": list(cfg.mean), "std": list(cfg.std)},
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB
