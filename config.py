"""Typed configs for every command, merged in one place: pipelines.yaml defaults <- pipeline entry <- CLI options.

Options given as ``None`` mean "not set on the command line" and leave the pipeline value in place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fpt import FptError

PIPELINES_FILE = Path(__file__).with_name("pipelines.yaml")


@dataclass
class ExtractConfig:
    name: str                          # dataset / store name
    data: Path | None                  # raw data root (None for generated datasets)
    source: str                        # "folder" (ImageFolder tree) or "synthetic"
    out: Path
    backbone: str
    res: int                           # LPM input side
    token_ratio: float
    importance: str                    # "global" | "cls"
    image_res: int                     # stored low-res copy side
    batch_size: int
    device: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layers: list[int] | None = None    # None = last half of the LPM
    weights: Path | None = None
    random_init: bool = False
    overwrite: bool = False
    classes: list[str] | None = None
    counts: dict[str, int] | None = None   # synthetic only
    seed: int = 0
    samples_per_shard: int | None = None   # None = chosen from the sample size
    query_block: int = 256                 # queries per block in the importance computation


@dataclass
class TrainConfig:
    store: Path
    out: Path | None
    side_res: int
    prompts: int
    reduction: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


def load_pipelines(path: Path = PIPELINES_FILE) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def pipeline_entry(name: str | None, pipelines: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline ``name`` merged over ``defaults`` (``{}`` entry for ``None`` or an unlisted store name)."""
    pipelines = pipelines or load_pipelines()
    defaults = pipelines["defaults"]
    entry = pipelines["pipelines"].get(name, {}) if name else {}
    merged = {k: v for k, v in defaults.items() if k not in ("extract", "train")}
    merged.update({k: v for k, v in entry.items() if k not in ("extract", "train")})
    merged["extract"] = {**defaults["extract"], **entry.get("extract", {})}
    merged["train"] = {**defaults["train"], **entry.get("train", {})}
    return merged


def known_pipelines() -> list[str]:
    return sorted(load_pipelines()["pipelines"])


def parse_layers(text: str | None) -> list[int] | None:
    """``"6-11"`` -> [6..11], ``"6,8,10"`` -> [6, 8, 10], ``None``/``""`` -> None."""
    if not text:
        return None
    try:
        out: list[int] = []
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise FptError(f"--layers {text!r}: expected a range like 6-11 or a list like 6,8,10") from None
    if not out or sorted(set(out)) != out:
        raise FptError(f"--layers {text!r}: layers must be distinct and increasing")
    return out


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise FptError(f"--{what} {text!r}: expected comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(values) not in (1, 3):
        raise FptError(f"--{what} {text!r}: give one value or three (R,G,B)")
    return values * 3 if len(values) == 1 else values


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def extract_config(dataset: str | None = None, data: Path | None = None, **options: Any) -> ExtractConfig:
    """Resolve ``fpt extract`` options. ``dataset`` names a pipeline; ``data`` points at raw data."""
    pipelines = load_pipelines()
    if dataset is None and data is None:
        raise FptError("give --dataset NAME (one of: " + ", ".join(known_pipelines()) + ") or --data PATH")
    if dataset is not None and dataset not in pipelines["pipelines"]:
        raise FptError(f"unknown dataset {dataset!r}; known: {', '.join(known_pipelines())} (or use --data PATH)")
    entry = pipeline_entry(dataset, pipelines)
    name = dataset or Path(data).resolve().name
    source = entry.get("source", "folder")
    if source != "synthetic":
        env = entry.get("data_env") or f"FPT_DATA_{name.upper()}"
        data = data or (Path(os.environ[env]) if os.environ.get(env) else None) or (
            Path(entry["data"]) if entry.get("data") else None)
        if data is None:
            raise FptError(f"no data path for dataset {name!r}: pass --data PATH or set {env}=PATH")
        if not Path(data).exists():
            raise FptError(f"data path {data} does not exist")
    values: dict[str, Any] = {**entry["extract"], **_given(options)}
    values["mean"] = tuple(values.get("mean") or entry["mean"])
    values["std"] = tuple(values.get("std") or entry["std"])
    values.setdefault("out", None)
    values["out"] = Path(values["out"] or f"{name}.zarr")
    values["layers"] = parse_layers(values["layers"]) if isinstance(values.get("layers"), str) else values.get("layers")
    allowed = {f.name for f in fields(ExtractConfig)}
    cfg = ExtractConfig(
        name=name, data=Path(data) if data else None, source=source,
        classes=entry.get("classes"), counts=entry.get("counts"), seed=entry.get("seed", 0),
        **{k: v for k, v in values.items() if k in allowed and k not in ("name", "data", "source")},
    )
    validate_extract(cfg)
    return cfg


def validate_extract(cfg: ExtractConfig) -> None:
    if not 0 < cfg.token_ratio <= 1:
        raise FptError(f"--token-ratio {cfg.token_ratio}: must be in (0, 1]")
    if cfg.importance not in ("global", "cls"):
        raise FptError(f"--importance {cfg.importance!r}: choose global or cls")
    if cfg.res <= 0 or cfg.image_res <= 0 or cfg.batch_size <= 0:
        raise FptError("--res, --image-res and --batch-size must be positive")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise FptError(f"--device {cfg.device!r}: choose auto, cpu or cuda")
    if cfg.weights is not None and cfg.random_init:
        raise FptError("--weights and --random-init exclude each other")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FptError(f"--weights {cfg.weights}: no such file")


def train_config(store: Path, dataset: str | None = None, **options: Any) -> TrainConfig:
    """Resolve ``fpt train`` options; ``dataset`` (from the store's attrs) selects per-dataset defaults."""
    pipelines = load_pipelines()
    entry = pipeline_entry(dataset if dataset in pipelines["pipelines"] else None, pipelines)
    values = {**entry["train"], **_given(options)}
    allowed = {f.name for f in fields(TrainConfig)} - {"store", "extra"}
    cfg = TrainConfig(store=Path(store), **{k: values.get(k) for k in allowed})
    if cfg.prompts < 0:
        raise FptError(f"--prompts {cfg.prompts}: must be 0 (side network alone) or more")
    if cfg.reduction <= 0 or cfg.epochs <= 0 or cfg.batch_size <= 0 or cfg.side_res <= 0:
        raise FptError("--reduction, --epochs, --batch-size and --side-res must be positive")
    if cfg.lr <= 0 or cfg.weight_decay < 0:
        raise FptError("--lr must be positive and --weight-decay non-negative")
    return cfg
