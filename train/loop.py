"""``fpt train`` / ``fpt evaluate``: AdamW + cosine schedule on the store's train split, model selection by
val AUC, test evaluation of the best checkpoint."""
from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fpt import FptError
from fpt.config import TrainConfig
from fpt.store import StoreReader
from fpt.train.data import SideInput, SplitData
from fpt.train.metrics import classification_metrics
from fpt.train.model import ModelSpec, SideNetwork, parameter_counts


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FptError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def model_spec(reader: StoreReader, cfg: TrainConfig) -> ModelSpec:
    bb, g = reader.attrs["backbone"], reader.geometry
    if cfg.side_res % bb["patch_size"]:
        raise FptError(f"--side-res {cfg.side_res} is not a multiple of the patch size {bb['patch_size']}")
    if bb["embed_dim"] % cfg.reduction:
        raise FptError(f"--reduction {cfg.reduction} does not divide the LPM width {bb['embed_dim']}")
    if cfg.side_res > g.image_res:
        raise FptError(f"--side-res {cfg.side_res} exceeds the store's low-res images ({g.image_res} px)")
    return ModelSpec(lpm_dim=bb["embed_dim"], lpm_heads=g.heads, head_dim=g.head_dim, patch_size=bb["patch_size"],
                     layers=g.layers, n_classes=len(reader.classes), side_res=cfg.side_res, prompts=cfg.prompts,
                     reduction=cfg.reduction)


def store_identity(reader: StoreReader) -> dict[str, Any]:
    """What a checkpoint must agree with to be used on a store."""
    return {"backbone": reader.attrs["backbone"]["name"],
            "weights_sha256": reader.attrs["backbone"]["weights_sha256"],
            "extraction": reader.attrs["extraction"], "classes": reader.classes}


@torch.no_grad()
def predict(model: SideNetwork, data: SplitData, side_input: SideInput, batch_size: int,
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, C] and labels [N] for a split, in store order."""
    model.eval()
    probs, labels = [], []
    for b in data.batches(batch_size, device=device):
        logits = model(side_input(b.images, train=False), *_kv(b, model))
        probs.append(logits.float().softmax(-1).cpu().numpy())
        labels.append(b.labels.cpu().numpy())
    return np.concatenate(probs), np.concatenate(labels)


def _kv(batch, model: SideNetwork):
    if model.fusion is None:
        return None, None
    return batch.keys.float(), batch.values.float()


def train(cfg: TrainConfig, on_epoch: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train the side network on ``cfg.store``; writes metrics.json, best.pt and log.jsonl to the run dir."""
    reader = StoreReader(cfg.store)
    reader.require_complete()
    spec = model_spec(reader, cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out or f"runs/{cfg.store.name.removesuffix('.zarr')}-{datetime.now():%Y%m%d-%H%M%S}")
    if (out / "metrics.json").exists():
        raise FptError(f"{out} already holds a finished run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    with_kv = cfg.prompts > 0
    train_data, val_data, test_data = (SplitData(reader, s, with_kv) for s in ("train", "val", "test"))
    side_input = SideInput(cfg.side_res, reader.attrs["normalization"]["mean"], reader.attrs["normalization"]["std"])
    model = SideNetwork(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(train_data) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    identity = store_identity(reader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    best_auc, best_epoch, best_val = -1.0, -1, {}
    log = open(out / "log.jsonl", "w")
    samples, seconds = 0, 0.0
    for epoch in range(cfg.epochs):
        model.train()
        start, losses = time.perf_counter(), []
        for b in train_data.batches(cfg.batch_size, shuffle=True, rng=rng, device=device):
            logits = model(side_input(b.images, train=True), *_kv(b, model))
            loss = F.cross_entropy(logits, b.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        epoch_seconds = time.perf_counter() - start
        samples, seconds = samples + len(train_data), seconds + epoch_seconds
        val = classification_metrics(*reversed(predict(model, val_data, side_input, cfg.batch_size, device)))
        val_auc = val["auc"] if val["auc"] is not None else val["acc"]
        if val_auc > best_auc:
            best_auc, best_epoch, best_val = val_auc, epoch, val
            torch.save({"model": model.state_dict(), "spec": spec.as_dict(), "store": identity,
                        "config": _jsonable(asdict(cfg)), "epoch": epoch}, out / "best.pt")
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0],
                  "val": val, "seconds": round(epoch_seconds, 3), "best_epoch": best_epoch}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if on_epoch:
            on_epoch(record)
    log.close()

    model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True)["model"])
    test = classification_metrics(*reversed(predict(model, test_data, side_input, cfg.batch_size, device)))
    metrics = {
        "method": "fpt+" if cfg.prompts > 0 else "side-only",
        "best_epoch": best_epoch, "val": best_val, "test": test,
        "params": parameter_counts(model, reader.attrs["backbone"]["n_params"]),
        "throughput": {"train_samples_per_s": round(samples / seconds, 2) if seconds else None,
                       "peak_memory_mb": round(peak_memory_mb(device), 1), "device": str(device)},
        "config": _jsonable(asdict(cfg)), "store": str(cfg.store), "run_dir": str(out),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def evaluate_checkpoint(store: Path, checkpoint: Path, split: str = "test", batch_size: int = 32,
                        device: str = "auto") -> dict[str, Any]:
    """Metrics of a saved checkpoint on one split of a store; refuses a checkpoint from another extraction."""
    reader = StoreReader(store)
    reader.require_complete()
    if split not in ("train", "val", "test"):
        raise FptError(f"--split {split!r}: choose train, val or test")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        spec = ModelSpec(**ckpt["spec"])
    except FileNotFoundError:
        raise FptError(f"--checkpoint {checkpoint}: no such file") from None
    except Exception as e:
        raise FptError(f"--checkpoint {checkpoint} is not an fpt checkpoint ({type(e).__name__})") from None
    mismatch = [k for k, v in store_identity(reader).items() if _jsonable(ckpt["store"].get(k)) != _jsonable(v)]
    if mismatch:
        raise FptError(f"checkpoint {checkpoint} was trained on another store ({', '.join(mismatch)} differ)")
    dev = resolve_device(device)
    model = SideNetwork(spec).to(dev)
    model.load_state_dict(ckpt["model"])
    data = SplitData(reader, split, with_kv=spec.prompts > 0)
    side_input = SideInput(spec.side_res, reader.attrs["normalization"]["mean"], reader.attrs["normalization"]["std"])
    probs, labels = predict(model, data, side_input, batch_size, dev)
    return {"split": split, "n": len(labels), **classification_metrics(labels, probs)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
