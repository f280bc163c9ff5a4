"""Typed results of training and evaluation (what ``train``/``evaluate_checkpoint`` return, what the CLI shows and
the sweep aggregates), with their JSON form (metrics.json). Metric values by name (``auc``, ``acc``, ``f1``,
``kappa``, ``precision``, ``recall``; val also ``loss``) stay mappings: ``classification_metrics``'s output."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

Metrics = dict[str, float | None]       # metric name -> value (None where undefined on the data)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def validation_score(metrics: Metrics) -> float | None:
    """What selects the best epoch and the best sweep configuration: AUC, or accuracy where AUC is undefined
    (None for a run that diverged before its first validation)."""
    return metrics["auc"] if metrics["auc"] is not None else metrics["acc"]


@dataclass
class Throughput:
    train_samples_per_s: float | None          # all epochs of the run
    steady_train_samples_per_s: float | None   # epochs after the first of each (re)start: no warm-up, no compiling
    peak_memory_mb: float
    memory_kind: str                           # cuda_max_allocated or cpu_peak_rss (+ "_shared": PeakMemory)
    memory_baseline_mb: float
    device: str
    compiled: bool
    captured: bool                             # the training step ran as one CUDA graph
    torch_threads: int


@dataclass
class RunMetrics:
    """One finished training run (metrics.json)."""
    method: str
    best_epoch: int
    best_reason: str              # why that epoch: highest val score, or the tie-break that chose it
    val: Metrics                  # of the best epoch
    test: Metrics                 # of the best epoch's checkpoint
    params: dict[str, float]      # learnable, lpm, total, ratio_percent
    efficiency: dict[str, Any]    # PPE/PME of the test AUC
    throughput: Throughput
    data: dict[str, Any]          # the data plan: cache decision, split sizes, device, resume, skipped samples
    config: dict[str, Any]
    store: str
    run_dir: str
    diverged_epoch: int | None = None   # the epoch after which loss or weights were not finite: training's end

    def as_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunMetrics":
        known = {f.name for f in fields(Throughput)}
        throughput = Throughput(**{k: values["throughput"].get(k) for k in known})
        return cls(**{**{f.name: values.get(f.name) for f in fields(cls)}, "throughput": throughput})


@dataclass
class Evaluation:
    """A checkpoint evaluated on one split of a store."""
    split: str
    n: int
    method: str
    metrics: Metrics


# -- fpt sweep --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeanStd:
    mean: float | None
    std: float | None       # sample standard deviation (ddof 1; 0 for one value)
    n: int                  # values that were defined


@dataclass(frozen=True)
class GridPoint:
    """One grid run: its configuration and validation result."""
    lr: float
    weight_decay: float
    seed: int
    val_score: float        # what selects the best point (validation_score: AUC, accuracy where undefined)
    val: dict[str, Any]
    run_dir: str


@dataclass(frozen=True)
class SeedResult:
    """The best configuration at one seed: its test result."""
    seed: int
    test: dict[str, Any]
    val: dict[str, Any]
    best_epoch: int
    best_reason: str
    run_dir: str


@dataclass
class SweepSummary:
    """What a sweep found (sweep.json is ``as_dict()``); ``ran``/``skipped``: runs trained in this call / found
    finished."""
    store: str
    method: str
    protocol: str
    grid: list[GridPoint]
    best_lr: float
    best_weight_decay: float
    seeds: list[SeedResult]
    test: dict[str, MeanStd]              # per test metric, over the seeds
    params: dict[str, Any]
    efficiency: dict[str, Any]            # PPE / PME of the mean test AUC
    throughput: dict[str, Any]            # per-run figures as MeanStd, and the memory kind
    config: dict[str, Any]
    ran: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        """sweep.json."""
        out = jsonable(asdict(self))
        best = {"lr": out.pop("best_lr"), "weight_decay": out.pop("best_weight_decay")}
        for key in ("ran", "skipped"):
            out.pop(key)
        return {**{k: out[k] for k in ("store", "method", "protocol", "grid")}, "best": best,
                **{k: out[k] for k in ("seeds", "test", "params", "efficiency", "throughput", "config")}}
