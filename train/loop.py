"""``fpt train`` / ``fpt evaluate``: one training loop for every method (fpt+, fpt, side-only, linear-probe):
AdamW + cosine schedule on the store's train split, model selection by val AUC, test evaluation of the best
checkpoint. A killed run resumes from its last finished epoch (``last.pt``) with identical results."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fpt import FptError
from fpt.config import TrainConfig, resolve_device
from fpt.store import StoreReader, store_stem, verify
from fpt.train.data import SideInput, SplitData, open_split, plan_cache
from fpt.train.memory import PeakMemory
from fpt.train.metrics import classification_metrics, pme, ppe
from fpt.train.model import LinearProbe, ModelSpec, SideNetwork, build_model, parameter_counts

# config fields that do not change what a run computes (a resumed or re-used run may differ in these)
RUNTIME_FIELDS = ("out", "device", "cache", "cache_budget_mb", "workers", "ft_memory_mb", "extra", "corrupt")


def model_spec(reader: StoreReader, cfg: TrainConfig) -> ModelSpec:
    bb, g = reader.attrs["backbone"], reader.geometry
    if cfg.method != "linear-probe":
        if cfg.side_res % bb["patch_size"]:
            raise FptError(f"--side-res {cfg.side_res} is not a multiple of the patch size {bb['patch_size']}")
        if bb["embed_dim"] % cfg.reduction:
            raise FptError(f"--reduction {cfg.reduction} does not divide the LPM width {bb['embed_dim']}")
        if cfg.side_res > g.image_res:
            raise FptError(f"--side-res {cfg.side_res} exceeds the store's low-res images ({g.image_res} px)")
    return ModelSpec(lpm_dim=bb["embed_dim"], lpm_heads=g.heads, head_dim=g.head_dim, patch_size=bb["patch_size"],
                     layers=g.layers, n_classes=len(reader.classes), side_res=cfg.side_res, prompts=cfg.prompts,
                     reduction=cfg.reduction, method=cfg.method)


def store_identity(reader: StoreReader) -> dict[str, Any]:
    """What a checkpoint must agree with to be used on a store (and what ``fpt predict`` needs to redo it)."""
    return {"backbone": reader.attrs["backbone"]["name"],
            "weights_sha256": reader.attrs["backbone"]["weights_sha256"],
            "extraction": reader.attrs["extraction"], "classes": reader.classes,
            "normalization": reader.attrs["normalization"]}


@dataclass
class Checkpoint:
    model: SideNetwork | LinearProbe      # on the CPU, in eval mode
    spec: ModelSpec
    store: dict[str, Any]                 # the store identity it was trained on
    config: dict[str, Any]
    epoch: int


def load_checkpoint(path: Path, reader: StoreReader | None = None) -> Checkpoint:
    """A saved best.pt, rebuilt for its method; with ``reader``, refused unless trained on that store."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        spec = ModelSpec(**ckpt["spec"])
        model = build_model(spec)
        model.load_state_dict(ckpt["model"])
    except FileNotFoundError:
        raise FptError(f"--checkpoint {path}: no such file") from None
    except FptError:
        raise
    except Exception as e:
        raise FptError(f"--checkpoint {path} is not an fpt checkpoint ({type(e).__name__})") from None
    if reader is not None:
        mismatch = [k for k, v in store_identity(reader).items() if jsonable(ckpt["store"].get(k)) != jsonable(v)]
        if mismatch:
            raise FptError(f"checkpoint {path} was trained on another store ({', '.join(mismatch)} differ)")
    return Checkpoint(model.eval(), spec, ckpt["store"], ckpt.get("config", {}), ckpt.get("epoch", -1))


@torch.no_grad()
def predict(model: SideNetwork | LinearProbe, data: SplitData, side_input: SideInput,
            batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, C] and labels [N] for a split."""
    model.eval()
    probs, labels = [], []
    for b in data.batches(batch_size):
        logits = model.forward_batch(b, partial(side_input, train=False))
        probs.append(logits.float().softmax(-1).cpu().numpy())
        labels.append(b["labels"].cpu().numpy())
    return np.concatenate(probs), np.concatenate(labels)


def _score(metrics: dict) -> float:
    return metrics["auc"] if metrics["auc"] is not None else metrics["acc"]


def comparable_config(cfg: TrainConfig | dict) -> dict[str, Any]:
    """The part of a run's config that fixes its results."""
    values = jsonable(asdict(cfg) if isinstance(cfg, TrainConfig) else cfg)
    return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS}


def train(cfg: TrainConfig, on_epoch: Callable[[dict], None] | None = None,
          on_start: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.store``; writes metrics.json, best.pt, last.pt and log.jsonl to the run dir.

    ``on_start(info)`` gets the data plan (cache decision, sizes) before the first epoch, ``on_epoch(record)``
    each epoch's log record. A run dir holding an unfinished run of the same configuration resumes from its
    last finished epoch."""
    reader = StoreReader(cfg.store)
    reader.require_complete()
    spec = model_spec(reader, cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out or f"runs/{store_stem(cfg.store)}-{datetime.now():%Y%m%d-%H%M%S}")
    if (out / "metrics.json").exists():
        raise FptError(f"{out} already holds a finished run; choose another --out")
    resume = _resume_state(out, cfg)
    plan = plan_cache(reader, spec.inputs, cfg.cache, device, cfg.cache_budget_mb)
    corrupt = exclude_corrupt(reader, spec.inputs, cfg.skip_corrupt, known=cfg.corrupt)
    out.mkdir(parents=True, exist_ok=True)

    train_data, val_data = (open_split(reader, s, spec.inputs, plan.mode, device, cfg.workers) for s in ("train", "val"))
    info = {"method": spec.method, "cache": plan.as_dict(), "train": len(train_data), "val": len(val_data),
            "device": str(device), "resumed_from_epoch": resume["epoch"] if resume else None,
            "corrupt_skipped": corrupt}
    if on_start:
        on_start(info)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    norm = reader.attrs["normalization"]
    side_input = SideInput(cfg.side_res, norm["mean"], norm["std"], seed=cfg.seed, augment=cfg.augment)
    model = build_model(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = max(1, len(train_data) // cfg.batch_size) if cfg.drop_last else -(-len(train_data) // cfg.batch_size)
    steps = cfg.epochs * batches
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    identity = store_identity(reader)
    history: list[dict] = []
    best = {"score": -1.0, "epoch": -1, "val": {}}
    samples, seconds, first_epoch = 0, 0.0, 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        _set_rng_state(resume["rng"], rng, side_input, device)
        history, best, samples, seconds = resume["history"], resume["best"], resume["samples"], resume["seconds"]
        first_epoch = resume["epoch"] + 1
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

    with PeakMemory(device) as memory:
        for epoch in range(first_epoch, cfg.epochs):
            model.train()
            start, losses = time.perf_counter(), []
            for b in train_data.batches(cfg.batch_size, shuffle=True, rng=rng, drop_last=cfg.drop_last):
                logits = model.forward_batch(b, partial(side_input, train=True))
                loss = F.cross_entropy(logits, b["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.detach())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - start
            samples, seconds = samples + len(train_data), seconds + epoch_seconds
            val = classification_metrics(*reversed(predict(model, val_data, side_input, cfg.batch_size)))
            if _score(val) > best["score"]:
                best = {"score": _score(val), "epoch": epoch, "val": val}
                _save(out / "best.pt", {"model": model.state_dict(), "spec": spec.as_dict(), "store": identity,
                                        "config": jsonable(asdict(cfg)), "epoch": epoch})
            record = {"epoch": epoch, "loss": float(torch.stack(losses).mean()), "lr": schedule.get_last_lr()[0],
                      "val": val, "seconds": round(epoch_seconds, 3), "best_epoch": best["epoch"]}
            history.append(record)
            _save(out / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "schedule": schedule.state_dict(), "rng": _rng_state(rng, side_input, device),
                                    "history": history, "best": best, "samples": samples, "seconds": seconds,
                                    "epoch": epoch, "config": comparable_config(cfg)})
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            if on_epoch:
                on_epoch(record)

    del train_data, val_data
    model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True)["model"])
    test_data = open_split(reader, "test", spec.inputs, "none", device, cfg.workers)
    test = classification_metrics(*reversed(predict(model, test_data, side_input, cfg.batch_size)))
    params = parameter_counts(model, reader.attrs["backbone"]["n_params"])
    peak_mb = round(memory.peak_mb, 1)
    metrics = {
        "method": spec.method,
        "best_epoch": best["epoch"], "val": best["val"], "test": test,
        "params": params,
        "efficiency": efficiency(test, params, peak_mb, cfg.ft_memory_mb),
        "throughput": {"train_samples_per_s": round(samples / seconds, 2) if seconds else None,
                       "peak_memory_mb": peak_mb, "memory_kind": memory.kind,
                       "memory_baseline_mb": round(memory.baseline_mb, 1), "device": str(device), "torch_threads": torch.get_num_threads()},
        "data": info,
        "config": jsonable(asdict(cfg)), "store": str(cfg.store), "run_dir": str(out),
    }
    (out / "last.pt").unlink(missing_ok=True)
    _save_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def exclude_corrupt(reader: StoreReader, names: tuple[str, ...], skip: bool, known: list[str] | None = None
                    ) -> list[str]:
    """Read and checksum every chunk the run will use (unless ``known`` gives the corrupt ids a caller found,
    e.g. once for a whole sweep). Corrupt samples stop the run, named, or with ``skip`` are left out of every
    split; returns their ids."""
    if known is not None:
        bad = np.flatnonzero(np.isin(reader.ids, known))
    else:
        bad = verify(reader.path, arrays=(*names, "labels", "split")).bad_samples
    if len(bad) == 0:
        return []
    ids = [str(reader.ids[i]) for i in bad]
    if not skip:
        raise FptError(f"{reader.path}: {len(ids)} samples are corrupt ({', '.join(ids[:5])}"
                       f"{', ...' if len(ids) > 5 else ''}); `fpt store verify` lists them, "
                       "--skip-corrupt trains without them")
    reader.exclude(bad)
    return ids


def resume_config(run: Path, **runtime: Any) -> TrainConfig:
    """The configuration of the unfinished run in ``run`` (from its last.pt), to continue it in place;
    ``runtime`` may set the fields that do not change results (device, cache, workers, ...)."""
    if (run / "metrics.json").exists():
        raise FptError(f"{run} is finished already (metrics.json); nothing to resume")
    try:
        saved = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["config"]
    except FileNotFoundError:
        raise FptError(f"--resume {run}: no unfinished run there (no last.pt)") from None
    except Exception as e:
        raise FptError(f"--resume {run}: cannot read last.pt ({type(e).__name__})") from None
    return TrainConfig(**{"device": "auto", **saved, "store": str(saved["store"]), "out": run,
                          **{k: v for k, v in runtime.items() if v is not None}})


def efficiency(test: dict, params: dict, peak_memory_mb: float, ft_memory_mb: float | None) -> dict[str, Any]:
    """PPE and PME (paper eqs. 9-10) of the test AUC; PME only with a full fine-tuning memory reference."""
    score = test["auc"]
    return {"score": "test_auc", "ppe": None if score is None else ppe(score, params["ratio_percent"]),
            "pme": None if score is None or ft_memory_mb is None else pme(score, peak_memory_mb, ft_memory_mb),
            "ft_memory_mb": ft_memory_mb}


def _resume_state(out: Path, cfg: TrainConfig) -> dict | None:
    """The state of an unfinished run in ``out`` (None when there is none); refused if its config differs."""
    last = out / "last.pt"
    if not last.exists():
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception:
        return None                                 # a torn last.pt (killed while saving): start over
    if state.get("config") != comparable_config(cfg):
        theirs, ours = state.get("config") or {}, comparable_config(cfg)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise FptError(f"{out} holds an unfinished run with other settings ({', '.join(diff)}); "
                       "choose another --out or delete it")
    return state


def _rng_state(rng: np.random.Generator, side_input: SideInput, device: torch.device) -> dict:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "augment": side_input.generator.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, rng: np.random.Generator, side_input: SideInput, device: torch.device) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    side_input.generator.set_state(state["augment"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save(path: Path, obj: Any) -> None:
    """torch.save via a temporary file and an atomic rename, so a kill never leaves a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate_checkpoint(store: Path, checkpoint: Path, split: str = "test", batch_size: int = 32,
                        device: str = "auto") -> dict[str, Any]:
    """Metrics of a saved checkpoint on one split of a store; refuses a checkpoint from another extraction."""
    reader = StoreReader(store)
    reader.require_complete()
    if split not in ("train", "val", "test"):
        raise FptError(f"--split {split!r}: choose train, val or test")
    ckpt = load_checkpoint(checkpoint, reader)
    dev = resolve_device(device)
    model = ckpt.model.to(dev)
    data = open_split(reader, split, ckpt.spec.inputs, "none", dev)
    norm = reader.attrs["normalization"]
    side_input = SideInput(ckpt.spec.side_res, norm["mean"], norm["std"])
    probs, labels = predict(model, data, side_input, batch_size)
    return {"split": split, "n": len(labels), "method": ckpt.spec.method, **classification_metrics(labels, probs)}


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
