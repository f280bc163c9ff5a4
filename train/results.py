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


def validation_score(metrics: Metrics) -> float:
    """What selects the best epoch and the best sweep configuration: AUC, or accuracy where AUC is undefined."""
    return metrics["auc"] if metrics["auc"] is not None else metrics["acc"]


@dataclass
class Throughput:
    train_samples_per_s: float | None          # all epochs of the run
    steady_train_samples_per_s: float | None   # epochs after the first of each (re)start: no warm-up, no compiling
    peak_memory_mb: float
    memory_kind: str                           # cuda_max_allocated or cpu_peak_rss
    memory_baseline_mb: float
    device: str
    compiled: bool
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
