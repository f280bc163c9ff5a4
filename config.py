"""Typed configs for every command, merged in one place: pipelines.yaml defaults <- pipeline entry <- CLI options.

Options given as ``None`` mean "not set on the command line" and leave the pipeline value in place. Every key a
config is given (as an option or in a pipelines file) must be one it knows; each rule about values is checked
once, in the config's ``__post_init__`` or in the one function named for it.
"""
from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import yaml

if TYPE_CHECKING:
    import torch

from fpt import FptError
from fpt.store import CODECS, DEFAULT_CODEC, SPLITS, StoreReader, store_stem

PIPELINES_FILE = Path(__file__).with_name("pipelines.yaml")
PIPELINES_ENV = "FPT_PIPELINES"        # a user pipelines file merged over the packaged one (--pipelines wins)

# one option away: `--backbone NAME` takes these names as well as any timm ViT name
BACKBONE_ALIASES = {
    "fpt-code": "vit_base_patch16_384.orig_in21k_ft_in1k",   # the public FPT+ code's weights (the default)
    "in21k": "vit_base_patch16_224.augreg_in21k",            # the paper's text: ViT-B/16 pre-trained on ImageNet-21K
    "dino": "vit_base_patch16_224.dino",                     # the paper's self-supervised weights
    "vit-l": "vit_large_patch16_384.augreg_in21k_ft_in1k",   # the paper's ViT-L
}


def check_keys(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """Refuse keys a config does not know, naming them and the valid ones."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise FptError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                       f"valid: {', '.join(sorted(valid))}")


@dataclass(frozen=True)
class AugmentConfig:
    """The side network's training augmentation, drawn per image (the LPM's input is never augmented). The
    defaults are the published FPT+ configuration ("paper"); ``AUGMENT_PRESETS`` names the alternatives."""
    scale: tuple[float, float] = (0.8, 1.0)     # random resized crop: share of the image area
    ratio: tuple[float, float] = (0.7, 1.3)     # crop aspect ratio w/h, drawn log-uniformly
    hflip: float = 0.5                          # probability of a horizontal flip
    vflip: float = 0.0                          # probability of a vertical flip
    brightness: float = 0.2                     # colour jitter: factor uniform in [max(0, 1 - x), 1 + x]
    contrast: float = 0.2
    saturation: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        (s0, s1), (r0, r1) = self.scale, self.ratio
        if not 0 < s0 <= s1 <= 1:
            raise FptError(f"augment scale {self.scale}: need 0 < min <= max <= 1")
        if not 0 < r0 <= r1:
            raise FptError(f"augment ratio {self.ratio}: need 0 < min <= max")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise FptError(f"augment {name} {getattr(self, name)}: a probability, in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise FptError(f"augment {name} {getattr(self, name)}: must not be negative")


AUGMENT_PRESETS = {
    "paper": AugmentConfig(),
    # fpt's earlier default: wider crops, vertical flips (suit modalities without an up, e.g. dermoscopy, histology)
    "strong": AugmentConfig(scale=(0.6, 1.0), ratio=(0.8, 1.25), vflip=0.5, saturation=0.1),
    "none": AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, brightness=0.0, contrast=0.0),
}
AUGMENT_KEYS = tuple(f.name for f in fields(AugmentConfig))


def parse_augment(value: AugmentConfig | str | dict | None) -> AugmentConfig:
    """``--augment``: a preset name with optional overrides, ``paper``, ``strong,vflip=0``,
    ``paper,scale=0.6:1`` (ranges as lo:hi); or a mapping (a pipelines file, a saved config) with an optional
    ``preset`` and any ``AugmentConfig`` fields. ``None`` is the paper's."""
    if isinstance(value, AugmentConfig):
        return value
    if value is None:
        return AUGMENT_PRESETS["paper"]
    if isinstance(value, str):
        name, *pairs = [p.strip() for p in value.split(",")]
        items: dict[str, Any] = {"preset": name}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            if not sep:
                raise FptError(f"--augment {value!r}: expected PRESET[,key=value...], e.g. paper,vflip=0.5")
            try:
                items[key.strip()] = [float(v) for v in text.split(":")] if ":" in text else float(text)
            except ValueError:
                raise FptError(f"--augment {value!r}: {key.strip()} takes a number (ranges as lo:hi)") from None
        value = items
    if not isinstance(value, dict):
        raise FptError(f"augment {value!r}: give a preset name or a mapping of {', '.join(AUGMENT_KEYS)}")
    values = dict(value)
    preset = values.pop("preset", "paper")
    if preset not in AUGMENT_PRESETS:
        raise FptError(f"augment preset {preset!r}: choose one of {', '.join(AUGMENT_PRESETS)}")
    check_keys(values, AUGMENT_KEYS, "augment")
    try:
        return replace(AUGMENT_PRESETS[preset], **values)
    except (TypeError, ValueError):
        raise FptError(f"augment {value!r}: scale and ratio take two numbers, the others one") from None


@dataclass
class ExtractConfig:
    name: str                          # dataset / store name
    data: Path | None                  # raw data root (None for generated datasets)
    source: str                        # "folder" (ImageFolder tree or .csv manifest), "cmmd" or "synthetic"
    out: str                           # store: a local path or an fsspec URL (s3://bucket/name.zarr, ...)
    backbone: str
    res: int                           # LPM input side
    token_ratio: float
    importance: str                    # "global" | "cls"
    image_res: int                     # stored low-res copy side
    batch_size: int | None             # None = fit the device (CUDA: start at 32, halve on out-of-memory)
    device: str
    mean: tuple[float, ...] | str      # or "auto": the train split's statistics, computed at extraction
    std: tuple[float, ...] | str
    layers: list[int] | None = None    # None = last half of the LPM
    weights: Path | None = None
    random_init: bool = False
    overwrite: bool = False
    classes: list[str] | None = None
    counts: dict[str, int] | None = None   # synthetic only
    seed: int = 0
    samples_per_shard: int | None = None   # None = chosen from the sample size
    query_block: int = 256                 # queries per block in the importance computation
    workers: int | None = None             # decode workers (DataLoader; None: 0 on CPU, one per core up to 16 on CUDA)
    write_threads: int | None = None       # shards written at once (None: 1 on CPU, one per core, 2 to 16, on CUDA)
    writers: str = "auto"                  # who writes them: "threads", "processes" (auto: processes on CUDA)
    precision: str = "auto"                # the LPM's autocast: bf16, fp16, fp32 (auto: fp16 on CUDA, fp32 on CPU)
    codec: str = DEFAULT_CODEC             # chunk compression of a new store, one of fpt.store.CODECS
    direct_io: bool = True                 # shard files written past the page cache where the filesystem allows
    on_error: str = "fail"                 # unreadable source image: "fail" (clear error) or "skip" (reported)
    j2k_decode: str = "full"               # JPEG 2000 DICOMs: "full", or "reduced" (the coarsest wavelet level
                                           # that still covers res: faster, not bit-identical; in the store's identity)


WRITERS = ("auto", "threads", "processes")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
J2K_DECODES = ("full", "reduced")
METHODS = ("fpt+", "fpt", "side-only", "linear-probe")
PROMPT_METHODS = ("fpt+", "fpt")
CACHE_MODES = ("auto", "none", "ram", "gpu")


def store_dataset(store: str | None) -> str:
    """The dataset (pipeline entry) name a store was extracted from: what fpt train and fpt sweep configure by."""
    if store is None:
        raise FptError("give --store PATH (or, for fpt train, --resume RUN to continue an interrupted run)")
    return StoreReader(store).attrs["dataset"]["name"]


# TrainConfig fields that do not change what a run computes (a resumed or re-used run may differ in these)
RUNTIME_FIELDS = ("out", "device", "cache", "cache_budget_mb", "workers", "ft_memory_mb", "corrupt",
                  "compile", "cuda_graph", "checkpoint_seconds")


def resume_options(run: str | Path, options: dict[str, Any]) -> dict[str, Any]:
    """``fpt train --resume RUN`` continues RUN with its own settings. ``options``: the command's options by
    field name, None when not given. Those that would change its results are refused by their flag, and so is
    ``out`` (RUN is the run's folder); the runtime ones given are returned."""
    fixed = [k for k, v in options.items() if v is not None and (k == "out" or k not in RUNTIME_FIELDS)]
    if fixed:
        flags = ("--drop-last/--keep-last" if k == "drop_last" else "--" + k.replace("_", "-") for k in fixed)
        raise FptError(f"--resume continues {run} with its own settings: drop {', '.join(flags)} (a run with other "
                       "settings is a new run: --out)")
    return {k: v for k, v in options.items() if v is not None}


def train_config_from_options(store: str | None, pipelines: Path | str | None = None,
                              **options: Any) -> TrainConfig:
    """``fpt train``'s options (None where not given) -> its TrainConfig, configured by the store's dataset."""
    check_prompts_given(options.get("method"), options.get("prompts"))
    return train_config(store, store_dataset(store), pipelines, **options)


def sweep_config_from_options(store: str | None, **options: Any) -> SweepConfig:
    """``fpt sweep``'s options (None where not given) -> its SweepConfig, configured by the store's dataset."""
    check_prompts_given(options.get("method"), options.get("prompts"))
    return sweep_config(store, store_dataset(store), **options)


def check_prompts_given(method: str | None, prompts: int | None) -> None:
    """A user who names a method without prompts (``--method side-only``) and a prompt count (``--prompts 8``)
    meant something else: refused. (Programs may pass a prompt count for every method: ``resolve_method``.)"""
    if method in METHODS and method not in PROMPT_METHODS and prompts:
        raise FptError(f"--method {method} has no prompts: drop --prompts {prompts}")


def resolve_method(method: str, prompts: int) -> tuple[str, int]:
    """The method and prompt count a run means: ``fpt+`` with 0 prompts is the side network alone (the old
    ``--prompts 0``), methods without prompts get 0, prompt methods need at least one."""
    if method not in METHODS:
        raise FptError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if prompts < 0:
        raise FptError(f"--prompts {prompts}: must be 0 (side network alone) or more")
    if method == "fpt+" and prompts == 0:
        method = "side-only"
    if method in PROMPT_METHODS and prompts == 0:
        raise FptError(f"--method {method} needs --prompts > 0 (use --method side-only for no prompts)")
    return method, prompts if method in PROMPT_METHODS else 0


@dataclass
class TrainConfig:
    store: str                            # a local path or an fsspec URL
    out: Path | None
    side_res: int
    prompts: int
    reduction: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float                   # AdamW, on all parameters
    seed: int
    device: str
    method: str = "fpt+"                  # one of METHODS; fpt+ with --prompts 0 means side-only
    augment: AugmentConfig = field(default_factory=AugmentConfig)   # the side input's; a preset name or mapping
    drop_last: bool = True                # drop each epoch's last partial train batch (the paper's), unless it
                                          # is the only one (a split smaller than one batch still trains)
    cache: str = "auto"                   # one of CACHE_MODES: where the train/val arrays live while training
    cache_budget_mb: float | None = None  # auto-cache budget; None = half the free GPU memory / available RAM
    workers: int | None = None            # store-reading processes when streaming; None = chosen per device
    ft_memory_mb: float | None = None     # full fine-tuning memory (same device kind) for PME; None = no PME
    skip_corrupt: bool = False            # leave out samples whose chunks fail their checksums (else: refuse)
    corrupt: list[str] | None = None      # ids a caller already found corrupt (None: checksum the store first)
    compile: bool | None = None           # torch.compile the training step; None = off
    cuda_graph: bool | None = None        # capture the step as one CUDA graph; None = on CUDA devices
    checkpoint_seconds: float = 30.0      # last.pt at most this often (0: every epoch); Ctrl-C always writes it

    def __post_init__(self) -> None:
        """Every rule on a training run's values, whoever builds it (options, a saved run, a sweep task)."""
        self.store, self.out = str(self.store), Path(self.out) if self.out else None     # as JSON gives them
        for name in ("lr", "weight_decay", "cache_budget_mb", "ft_memory_mb", "checkpoint_seconds"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise FptError(f"--{name.replace('_', '-')} {value}: must be a finite number")
        if not 0 <= self.seed < 2**32:
            raise FptError(f"--seed {self.seed}: must be from 0 to {2**32 - 1}")
        self.augment = parse_augment(self.augment)
        self.method, self.prompts = resolve_method(self.method, self.prompts)
        check_device(self.device)
        if self.cache not in CACHE_MODES:
            raise FptError(f"--cache {self.cache!r}: choose one of {', '.join(CACHE_MODES)}")
        if (self.workers is not None and self.workers < 0) or (
                self.cache_budget_mb is not None and self.cache_budget_mb < 0):
            raise FptError("--workers and --cache-budget-mb must not be negative")
        if self.ft_memory_mb is not None and self.ft_memory_mb <= 0:
            raise FptError(f"--ft-memory-mb {self.ft_memory_mb}: must be positive")
        if self.reduction <= 0 or self.epochs <= 0 or self.batch_size <= 0 or self.side_res <= 0:
            raise FptError("--reduction, --epochs, --batch-size and --side-res must be positive")
        if self.checkpoint_seconds < 0:
            raise FptError(f"--checkpoint-seconds {self.checkpoint_seconds}: must not be negative")
        if self.lr <= 0 or self.weight_decay < 0:
            raise FptError("--lr must be positive and --weight-decay non-negative")


@dataclass
class SweepConfig:
    """``fpt sweep``: grid-search lr x weight decay on val AUC, then repeat the best over ``seeds`` seeds."""
    train: TrainConfig          # the base run; lr, weight_decay, seed and out are set per run
    lrs: list[float]
    weight_decays: list[float]
    seeds: int                  # repeats of the best configuration: seeds train.seed, train.seed + 1, ...
    out: Path                   # sweep directory: one run directory per run, sweep.json, sweep.csv
    scheduler: str              # "local", "local:N" or a dask scheduler address
    runs_per_gpu: int | None = None   # runs at once per GPU of a local scheduler; None = from memory (fpt.train.sweep)
    runs_in: str | None = None  # a local scheduler's concurrent runs: "threads" or "processes"; None = by device

    def __post_init__(self) -> None:
        """Every rule on a sweep's own values (its runs' are TrainConfig's), whoever builds it."""
        if self.seeds < 1:
            raise FptError(f"--seeds {self.seeds}: must be at least 1")
        if self.train.seed + self.seeds - 1 >= 2**32:      # the repeats' seeds: seed, seed + 1, ...
            raise FptError(f"--seed {self.train.seed} with --seeds {self.seeds}: the repeats use seeds up to "
                           f"{self.train.seed + self.seeds - 1}, past {2**32 - 1}; give a lower --seed")
        if self.runs_per_gpu is not None and self.runs_per_gpu < 1:
            raise FptError(f"--runs-per-gpu {self.runs_per_gpu}: must be at least 1")
        if self.runs_in is not None and self.runs_in not in RUNS_IN:
            raise FptError(f"--runs-in {self.runs_in!r}: choose threads or processes")
        from fpt.cluster import check_scheduler         # (it imports torch)
        local = check_scheduler(self.scheduler)
        if self.runs_in == "threads" and not local:
            raise FptError("--runs-in threads needs a local scheduler (local or local:N): a running dask scheduler's "
                           "workers are processes of their own")
        if self.runs_in == "threads" and self.train.compile:
            raise FptError("--runs-in threads cannot compile the step (torch.compile is not thread-safe); use "
                           "--runs-in processes or --no-compile")


# ----------------------------------------------------------------------------- pipelines files

# keys a pipelines file may hold: `defaults` and every entry of `pipelines` share one schema
ENTRY_KEYS = ("source", "classes", "counts", "seed", "mean", "std", "data", "data_env", "extract", "train", "sweep")
EXTRACT_KEYS = tuple(f.name for f in fields(ExtractConfig) if f.name not in
                     ("name", "data", "source", "classes", "counts", "seed"))   # these come from the entry
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "store")
SWEEP_KEYS = ("lr", "lr_scale", "weight_decay", "seeds", "scheduler", "runs_in")
RUNS_IN = ("threads", "processes")
SECTION_KEYS = {"extract": EXTRACT_KEYS, "train": TRAIN_KEYS, "sweep": SWEEP_KEYS}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_pipelines(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise FptError(f"pipelines file {path}: no such file") from None
    except (OSError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise FptError(f"pipelines file {path}: not readable YAML ({str(e).splitlines()[0]}{where})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise FptError(f"pipelines file {path}: expected a mapping with `defaults` and/or `pipelines`")
    validate_pipelines(data, str(path))
    return data


# what the keys of a pipelines entry outside its sections hold (the sections' keys: their config's fields)
ENTRY_TYPES: dict[str, Any] = {"source": str, "classes": list[str], "counts": dict[str, int], "seed": int,
                               "mean": tuple[float, ...] | str, "std": tuple[float, ...] | str, "data": str,
                               "data_env": str}
SOURCES = ("folder", "cmmd", "synthetic")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from YAML fits a config field's annotation: lists stand for tuples, strings for paths
    and for ``--layers``-style text, a mapping or a preset name for an augmentation; an int is a float too."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if hint is AugmentConfig:
        return isinstance(value, (str, dict))
    if origin in (list, tuple):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return True


def _section_types() -> dict[str, dict[str, Any]]:
    grid = float | list[float] | str                      # one value, a list, or "1e-4,5e-4" as --lr takes it
    return {"extract": {**typing.get_type_hints(ExtractConfig), "layers": list[int] | str | None},
            "train": typing.get_type_hints(TrainConfig),
            "sweep": {"lr": grid, "lr_scale": grid, "weight_decay": grid, "seeds": int, "scheduler": str,
                      "runs_in": str | None}}


TYPE_WORDS = {bool: "true/false", int: "whole number", float: "number", str: "string", Path: "path",
              AugmentConfig: "preset name or mapping"}


def _describe(hint: Any, many: bool = False) -> str:
    """A field's annotation in words: ``a list of numbers or a string``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, many) for a in args)
    if hint is type(None) or hint is None:
        return "null"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0], many=True)}"
    if origin is dict:
        return f"a mapping of {_describe(args[0], many=True)} to {_describe(args[1], many=True)}"
    word = TYPE_WORDS.get(hint, str(hint))
    return f"{word}s" if many else f"a {word}"


def check_types(values: dict[str, Any], types_: dict[str, Any], where: str) -> None:
    """Refuse values of the wrong type in a pipelines file, naming the key, the value and what it takes (YAML
    reads ``1e-3`` as text: it needs a dot, ``1.0e-3``)."""
    for key, value in values.items():
        if key in types_ and not _fits(value, types_[key]):
            hint = " (YAML reads a number without a dot, such as 1e-3, as text: write 1.0e-3)" if (
                isinstance(value, str) and re.fullmatch(r"[-+]?\d+e[-+]?\d+", value.strip(), re.I)) else ""
            raise FptError(f"{where}.{key}: {value!r} is not {_describe(types_[key])}{hint}")


def validate_pipelines(data: dict[str, Any], where: str) -> None:
    """Refuse unknown keys anywhere in a pipelines file (``defaults`` and every entry share one schema), and values
    of the wrong type (``lr: 1e-3``, text to YAML; ``classes: benign``; ``mean: 0.5``)."""
    check_keys(data, ("defaults", "pipelines"), where)
    if not isinstance(data.get("pipelines") or {}, dict):
        raise FptError(f"{where}: pipelines must be a mapping of names to entries")
    entries = {"defaults": data.get("defaults") or {},
               **{f"pipelines.{name}": e for name, e in (data.get("pipelines") or {}).items()}}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise FptError(f"{where}: {name} must be a mapping")
        check_keys(entry, ENTRY_KEYS, f"{where}: {name}")
        check_types(entry, ENTRY_TYPES, f"{where}: {name}")
        if entry.get("source", "folder") not in SOURCES:
            raise FptError(f"{where}: {name}.source {entry['source']!r}: choose one of {', '.join(SOURCES)}")
        if entry.get("counts") is not None and sorted(entry["counts"]) != sorted(SPLITS):
            raise FptError(f"{where}: {name}.counts {entry['counts']!r}: give the samples of each split, "
                           f"{', '.join(SPLITS)}")
        for section, valid in SECTION_KEYS.items():
            values = entry.get(section) or {}
            if not isinstance(values, dict):
                raise FptError(f"{where}: {name}.{section} must be a mapping")
            check_keys(values, valid, f"{where}: {name}.{section}")
            check_types(values, _section_types()[section], f"{where}: {name}.{section}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings key by key (recursively), anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def packaged_pipelines() -> dict[str, Any]:
    """The packaged pipelines.yaml alone."""
    return _read_pipelines(PIPELINES_FILE)


def load_pipelines(user: Path | str | None = None) -> dict[str, Any]:
    """The packaged pipelines.yaml with the file named by ``$FPT_PIPELINES`` merged over it, then ``user``
    (``--pipelines FILE``) over both; an entry of a user file adds a pipeline or changes only the keys it names."""
    pipelines = packaged_pipelines()
    for path in (os.environ.get(PIPELINES_ENV), user):
        if path:
            pipelines = _merge(pipelines, _read_pipelines(Path(path)))
    return pipelines


def pipeline_entry(name: str | None, pipelines: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline ``name`` merged over ``defaults`` (``{}`` entry for ``None`` or an unlisted store name)."""
    pipelines = pipelines or load_pipelines()
    defaults = pipelines["defaults"]
    entry = (pipelines.get("pipelines") or {}).get(name, {}) if name else {}
    merged = {k: v for k, v in defaults.items() if k not in SECTION_KEYS}
    merged.update({k: v for k, v in entry.items() if k not in SECTION_KEYS})
    for section in SECTION_KEYS:
        merged[section] = {**(defaults.get(section) or {}), **(entry.get(section) or {})}
    return merged


def known_pipelines(pipelines: dict[str, Any] | None = None) -> list[str]:
    return sorted((pipelines or load_pipelines()).get("pipelines") or {})


def parse_layers(text: str | None) -> list[int] | None:
    """``"6-11"`` -> [6..11], ``"6,8,10"`` -> [6, 8, 10], ``None`` (the option not given) -> None; an empty
    ``--layers ""`` is refused rather than taken for the default."""
    if text is None:
        return None
    if not text.strip():
        raise FptError("--layers is empty: give a range like 6-11 or a list like 6,8,10, or leave the option out "
                       "for the last half of the LPM")
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


def parse_normalization(text: str | None, what: str) -> tuple[float, ...] | str | None:
    """``--mean``/``--std``: ``auto`` (train-split statistics, computed at extraction) or R,G,B numbers."""
    return "auto" if text is not None and text.strip().lower() == "auto" else parse_floats(text, what)


def _normalization(value: Any) -> tuple[float, ...] | str:
    return "auto" if value == "auto" else tuple(value) if isinstance(value, (list, tuple)) else value


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def extract_config(dataset: str | None = None, data: Path | None = None, pipelines: Path | str | None = None,
                   **options: Any) -> ExtractConfig:
    """Resolve ``fpt extract`` options. ``dataset`` names a pipeline; ``data`` points at raw data; ``pipelines``
    is a user pipelines file merged over the packaged one (see ``load_pipelines``)."""
    check_keys(options, EXTRACT_KEYS, "extract options")
    table = load_pipelines(pipelines)
    if dataset is None and data is None:
        raise FptError("give --dataset NAME (one of: " + ", ".join(known_pipelines(table)) + ") or --data PATH")
    if dataset is not None and dataset not in known_pipelines(table):
        raise FptError(f"unknown dataset {dataset!r}; known: {', '.join(known_pipelines(table))} (or use --data PATH)")
    entry = pipeline_entry(dataset, table)
    name = dataset or (Path(data).resolve().stem if Path(data).is_file() else Path(data).resolve().name)
    source = entry.get("source", "folder")
    if source == "synthetic" and data is not None:
        raise FptError(f"--data {data}: dataset {name!r} is synthetic (made in memory, read from no files); drop "
                       "--data, or drop --dataset to extract the images there")
    if source != "synthetic":
        env = entry.get("data_env") or f"FPT_DATA_{name.upper()}"
        data = data or (Path(os.environ[env]) if os.environ.get(env) else None) or (
            Path(entry["data"]) if entry.get("data") else None)
        if data is None:
            raise FptError(f"no data path for dataset {name!r}: pass --data PATH or set {env}=PATH")
        if not Path(data).exists():
            raise FptError(f"data path {data} does not exist")
    values: dict[str, Any] = {**entry["extract"], **_given(options)}
    if options.get("weights") is not None and options.get("random_init") is None:
        values["random_init"] = False       # given weights replace a pipeline's random init (the demo's)
    values["mean"] = _normalization(values.get("mean") or entry["mean"])
    values["std"] = _normalization(values.get("std") or entry["std"])
    values["backbone"] = BACKBONE_ALIASES.get(values["backbone"], values["backbone"])
    values["out"] = str(values.get("out") or f"{name}.zarr")
    values["layers"] = parse_layers(values["layers"]) if isinstance(values.get("layers"), str) else values.get("layers")
    cfg = ExtractConfig(name=name, data=Path(data) if data else None, source=source, classes=entry.get("classes"),
                        counts=entry.get("counts"), seed=entry.get("seed", 0), **values)
    validate_extract(cfg)
    return cfg


def check_lpm_weights(weights: Path | None, random_init: bool) -> None:
    """``--weights FILE`` and ``--random-init``: at most one, and the file exists."""
    if weights is not None and random_init:
        raise FptError("--weights and --random-init exclude each other")
    if weights is not None and not Path(weights).is_file():
        raise FptError(f"--weights {weights}: no such file")


def validate_extract(cfg: ExtractConfig) -> None:
    if not 0 < cfg.token_ratio <= 1:
        raise FptError(f"--token-ratio {cfg.token_ratio}: must be in (0, 1]")
    if cfg.codec not in CODECS:
        raise FptError(f"--codec {cfg.codec!r}: choose one of {', '.join(CODECS)}")
    if cfg.write_threads is not None and cfg.write_threads < 1:
        raise FptError(f"--write-threads {cfg.write_threads}: must be at least 1")
    if cfg.writers not in WRITERS:
        raise FptError(f"--writers {cfg.writers!r}: choose one of {', '.join(WRITERS)}")
    if cfg.precision not in PRECISIONS:
        raise FptError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.on_error not in ("fail", "skip"):
        raise FptError(f"--on-error {cfg.on_error!r}: choose fail or skip")
    if cfg.j2k_decode not in J2K_DECODES:
        raise FptError(f"--j2k-decode {cfg.j2k_decode!r}: choose one of {', '.join(J2K_DECODES)}")
    if cfg.importance not in ("global", "cls"):
        raise FptError(f"--importance {cfg.importance!r}: choose global or cls")
    if cfg.res <= 0 or cfg.image_res <= 0 or (cfg.batch_size is not None and cfg.batch_size <= 0):
        raise FptError("--res, --image-res and --batch-size must be positive")
    if (cfg.workers is not None and cfg.workers < 0) or (cfg.samples_per_shard is not None
                                                        and cfg.samples_per_shard < 0):
        raise FptError("--workers and --shard-size must not be negative (--shard-size 0: chosen from the sample size)")
    check_device(cfg.device)
    patch = re.search(r"patch(\d+)", cfg.backbone or "")      # timm names say their patch: vit_*_patch16_*
    if patch:                                                   # checked before the model loads (and again after)
        check_res_fits_patch(cfg.res, int(patch[1]), cfg.backbone)
        check_image_res_fits_patch(cfg.image_res, int(patch[1]), cfg.backbone)
    check_lpm_weights(cfg.weights, cfg.random_init)
    check_normalization(cfg.mean, cfg.std)


def check_res_fits_patch(res: int, patch: int, backbone: str) -> None:
    if res % patch:
        raise FptError(f"--res {res} is not a multiple of the patch size {patch} of {backbone}")


def check_image_res_fits_patch(image_res: int, patch: int, backbone: str) -> None:
    """The stored low-res copy must hold at least one patch: the side network's input (``--side-res``) is a
    multiple of the LPM's patch size and at most ``--image-res``, so below one patch no training could use it."""
    if image_res < patch:
        raise FptError(f"--image-res {image_res} is smaller than the patch size {patch} of {backbone}: no side "
                       f"network could train on the store (--side-res is a multiple of {patch}, at most --image-res)")


def check_normalization(mean: tuple[float, ...] | str, std: tuple[float, ...] | str) -> None:
    """Mean in [0, 1], std in (0, 1]: the LPM sees pixel values scaled to [0, 1], so 0-255 numbers are a mistake."""
    scale = "values are on the [0, 1] pixel scale, e.g. ImageNet's 0.485,0.456,0.406 / 0.229,0.224,0.225, or auto"
    for name, value in (("mean", mean), ("std", std)):
        if value != "auto" and (not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise FptError(f"--{name} {value!r}: give three numbers, R,G,B (or auto); {scale}")
    if mean != "auto" and not all(0 <= m <= 1 for m in mean):
        raise FptError(f"--mean {','.join(f'{m:g}' for m in mean)}: every value must be in [0, 1]; {scale}")
    if std != "auto" and not all(0 < s <= 1 for s in std):
        raise FptError(f"--std {','.join(f'{s:g}' for s in std)}: every value must be in (0, 1]; {scale}")


def _entry_for_store(dataset: str | None, pipelines: Path | str | None) -> dict[str, Any]:
    """The pipeline entry of a store's dataset name (defaults alone for a dataset without one)."""
    table = load_pipelines(pipelines)
    return pipeline_entry(dataset if dataset in known_pipelines(table) else None, table)


def train_config(store: str | Path, dataset: str | None = None, pipelines: Path | str | None = None,
                 **options: Any) -> TrainConfig:
    """Resolve ``fpt train`` options; ``dataset`` (from the store's attrs) selects per-dataset defaults."""
    check_keys(options, TRAIN_KEYS, "train options")
    values = {**_entry_for_store(dataset, pipelines)["train"], **_given(options)}
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return TrainConfig(store=str(store), **{k: values.get(k, defaults.get(k)) for k in TRAIN_KEYS})


def parse_grid(value: str | list | float | None, what: str) -> list[float] | None:
    """``"1e-4,5e-4"`` (or a YAML list / number) -> [0.0001, 0.0005]; ``None`` -> None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        grid = [float(v) for v in items]
    except (TypeError, ValueError):
        raise FptError(f"--{what} {value!r}: expected comma-separated numbers, e.g. 1e-4,5e-4,1e-3") from None
    if not grid or len(set(grid)) != len(grid):
        raise FptError(f"--{what} {value!r}: give distinct values")
    shown = [f"{v:g}" for v in grid]          # a sweep's run folders are named by these (lr0.001-wd0.1-seed0)
    same = sorted({t for t in shown if shown.count(t) > 1})
    if same:
        raise FptError(f"--{what} {value!r}: values that round to the same 6 significant digits ({', '.join(same)}) "
                       "would share a run folder; give values that differ there")
    return grid


def sweep_config(store: str | Path, dataset: str | None = None, lr: str | None = None, weight_decay: str | None = None,
                 seeds: int | None = None, scheduler: str | None = None, out: Path | None = None,
                 runs_per_gpu: int | None = None, runs_in: str | None = None, pipelines: Path | str | None = None,
                 **train_options: Any) -> SweepConfig:
    """Resolve ``fpt sweep`` options over the pipeline's ``sweep`` section; ``train_options`` as for train.
    Learning rates: ``lr`` (absolute values), else the section's ``lr``, else its ``lr_scale`` times the run's
    (the dataset's published) learning rate."""
    entry = _entry_for_store(dataset, pipelines)["sweep"]
    base = train_config(store, dataset, pipelines, **train_options)
    scaled = parse_grid(entry.get("lr_scale"), "lr-scale")
    lrs = (parse_grid(lr, "lr") or parse_grid(entry.get("lr"), "lr")
           or (scaled and [float(f"{base.lr * s:.12g}") for s in scaled]) or [base.lr])
    weight_decays = (parse_grid(weight_decay, "weight-decay") or parse_grid(entry.get("weight_decay"), "weight-decay")
                     or [base.weight_decay])
    for grid_lr, grid_weight_decay in product(lrs, weight_decays):     # TrainConfig's rules, before any run
        replace(base, lr=grid_lr, weight_decay=grid_weight_decay)
    return SweepConfig(train=base, lrs=lrs, weight_decays=weight_decays,
                       seeds=seeds if seeds is not None else entry.get("seeds", 1),
                       out=Path(out or f"sweeps/{store_stem(store)}-{base.method}"),
                       scheduler=scheduler or entry.get("scheduler", "local"), runs_per_gpu=runs_per_gpu,
                       runs_in=runs_in or entry.get("runs_in"))


# helper processes of one kind at most per fpt process: extraction's decode workers and its writers, training's
# store readers (a GPU host's cores; past them, processes only queue for the cores and take memory)
HOST_PROCESSES_MAX = 16

# how much lower a GPU run's helper processes set their CPU priority (nice): at +10 the kernel weighs each one at
# about a ninth of a normal process, so the process that drives the GPU gets a core first on a full machine
HELPER_NICENESS = 10
HELPER_NICENESS_ENV = "FPT_HELPER_NICENESS"


def helper_niceness(device: "torch.device") -> int:
    """How much lower the helper processes of a run on ``device`` set their CPU priority (``lower_priority``):
    extraction's decode workers and writer processes, training's store readers.

    On CUDA ``HELPER_NICENESS``. There the helpers fill every core (one decode worker and one writer per core),
    while the process that drives the GPU needs a core at the moment it has work: its first LPM step, a fresh
    process's ~1 s of loading kernels, ran 1.8-2.2 s beside them on an H200 (lease 5); each batch it issues
    waits for it. Niced helpers lose only the cores that process takes; the kernel divides the rest among them as
    before. On a CPU 0: the LPM or the training step there uses every core itself, and its helpers feed it.
    ``FPT_HELPER_NICENESS=N`` (0 to 19) overrides both, e.g. 0 to compare."""
    text = os.environ.get(HELPER_NICENESS_ENV)
    if text is None:
        return HELPER_NICENESS if device.type == "cuda" else 0
    if not (text.strip().isdigit() and 0 <= int(text) <= 19):
        raise FptError(f"{HELPER_NICENESS_ENV}={text!r}: must be a niceness from 0 to 19")
    return int(text)


def check_device(device: str) -> None:
    """``--device``: auto, cpu, cuda or cuda:N (what every command that takes it accepts)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise FptError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")


def resolve_device(device: str) -> "torch.device":
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA request without CUDA is a clear error."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FptError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise FptError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                       f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def resolve_precision(precision: str, device: "torch.device") -> str:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere. fp16 rather than bf16 on CUDA: the same speed there, and its 3 more
    mantissa bits keep the selection with the fp32 reference (99.82 % of tokens against 98.67 % in bf16, ViT-B at
    512 on a CPU; 98.86 % measured for bf16 on an H100); the K/V are stored as fp16 either way."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def parse_number(text: str | None, what: str) -> float | None:
    """One number for ``fpt train --lr/--weight-decay``; a comma-separated list is a grid, ``fpt sweep``'s job."""
    if text is None:
        return None
    if "," in text:
        raise FptError(f"--{what} {text}: fpt train takes one value; to grid-search several, run "
                       f"fpt sweep --store STORE --{what} {text}")
    try:
        return float(text)
    except ValueError:
        raise FptError(f"--{what} {text!r}: expected a number, e.g. 1e-3") from None


def low_res_warnings(cfg: ExtractConfig, pipelines: Path | str | None = None) -> list[str]:
    """Why the stored low-res copy (``--image-res``) may not serve training as the user expects: larger than the
    LPM input (it is then upsampled and holds no more detail), or smaller than the side network's default input
    in ``pipelines`` (the ``--pipelines`` file; training then needs a smaller ``--side-res``)."""
    side = _entry_for_store(cfg.name, pipelines)["train"]["side_res"]
    warnings = []
    if cfg.image_res > cfg.res:
        warnings.append(f"--image-res {cfg.image_res} is larger than --res {cfg.res}: the low-res copy is upsampled "
                        f"from the LPM input and holds no more detail (--image-res {cfg.res} stores less)")
    if cfg.image_res < side:
        warnings.append(f"--image-res {cfg.image_res} is smaller than the side network's default input ({side} px): "
                        f"train with --side-res {cfg.image_res} or less, or extract with --image-res {side}")
    return warnings
