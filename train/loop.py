"""``fpt train`` / ``fpt evaluate``: one training loop for every method (fpt+, fpt, side-only, linear-probe):
AdamW + cosine schedule on the store's train split, model selection by val AUC, test evaluation of the best
checkpoint. A stopped run resumes from its last checkpoint (``last.pt``: the last finished epoch after Ctrl-C
or an error, at most ``checkpoint_seconds`` old after a kill) with identical results.

``train`` = ``set_up`` (store, config, data plan, model, optimizer, resume) -> ``train_epoch`` per epoch (the
steps of ``fpt.train.step.TrainStep``, validation) + ``RunCheckpoints`` -> ``finish`` (test, metrics.json)."""
from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fpt import FptError, helper_process_died
from fpt.config import RUNTIME_FIELDS, TrainConfig, resolve_device
from fpt.store import SPLITS, StoreReader, store_stem, verify
from fpt.train.data import SharedSplits, SideInput, SplitData, batch_count, open_split, plan_cache
from fpt.train.files import CheckpointWriter, TensorCopies, atomic_write_text, copy_tensors, read_checkpoint
from fpt.train.memory import PeakMemory
from fpt.train.metrics import METRIC_NAMES, classification_metrics, efficiency
from fpt.train.model import (LinearProbe, ModelSpec, SideNetwork, build_model, lpm_parameters, parameter_counts,
                             seeded_model, use_generator)
from fpt.train.plots import write_evaluation_plots
from fpt.train.results import Evaluation, RunMetrics, Throughput, jsonable, validation_score
from fpt.train.step import TrainStep, make_optimizer, step_captures, step_compiles



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


def method_warnings(spec: ModelSpec, reader: StoreReader) -> list[str]:
    """What makes this run differ from the paper's version of its method, said before it trains: the earlier FPT
    has a side layer and a fusion module per LPM layer, so on a store of fewer layers it is a smaller FPT."""
    depth = reader.attrs["backbone"]["depth"]
    if spec.method == "fpt" and spec.layers < depth:
        return [f"--method fpt on {spec.layers} of the LPM's {depth} layers: the paper's FPT has a side layer and a "
                f"fusion module per LPM layer (Table 1: 1.81 % learnable); to compare with it, train on a store "
                f"extracted with --layers 0-{depth - 1}"]
    return []


def store_identity(reader: StoreReader) -> dict[str, Any]:
    """What a checkpoint must agree with to be used on a store (and what ``fpt predict`` needs to redo it)."""
    return {"backbone": reader.attrs["backbone"]["name"],
            "weights_sha256": reader.attrs["backbone"]["weights_sha256"],
            "weights_source": reader.attrs["backbone"]["weights_source"],
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
    """A saved best.pt (or an unfinished run's last.pt), rebuilt for its method; with ``reader``, refused unless
    trained on that store."""
    ckpt = read_checkpoint(path, "best")
    try:
        spec = ModelSpec(**ckpt["spec"])
        model = build_model(spec)
        model.load_state_dict(ckpt["model"])
    except FptError:
        raise
    except Exception as e:
        raise FptError(f"--checkpoint {path}: its model cannot be rebuilt ({type(e).__name__}: {e})") from e
    if reader is not None:
        mismatch = [k for k, v in store_identity(reader).items() if jsonable(ckpt["store"].get(k)) != jsonable(v)]
        if mismatch:
            raise FptError(f"checkpoint {path} was trained on another store ({', '.join(mismatch)} differ)")
    return Checkpoint(model.eval(), spec, ckpt["store"], ckpt["config"], ckpt["epoch"])


@torch.no_grad()
def predict_split(model: SideNetwork | LinearProbe, data: SplitData, side_input: SideInput, batch_size: int,
            step: TrainStep | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, C] and labels [N] for a split. With ``step`` its evaluation forward runs (compiled
    or captured, on batches padded to ``batch_size``, where the step is); results stay on the device until the
    split is done."""
    model.eval()
    if step is None:
        step = TrainStep(model, side_input, optimizer=None)
    probs, labels = [], []
    for b in data.batches(batch_size):
        probs.append(step.probabilities(b, batch_size))
        labels.append(b["labels"])
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()


def cross_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean cross-entropy of predicted probabilities probs [N, C] for labels [N]."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def comparable_config(cfg: TrainConfig | dict) -> dict[str, Any]:
    """The part of a run's config that fixes its results."""
    values = jsonable(asdict(cfg) if isinstance(cfg, TrainConfig) else cfg)
    return {k: v for k, v in values.items() if k not in RUNTIME_FIELDS}


@dataclass
class BestEpoch:
    """The selected checkpoint: highest validation score, ties to the lower val loss, then the earlier epoch."""
    epoch: int = -1
    score: float = -1.0
    loss: float = float("inf")
    reason: str = ""
    val: dict = field(default_factory=dict)

    def improved_by(self, epoch: int, val: dict) -> bool:
        """Take ``epoch`` when it beats this one (and say why)."""
        score, loss = validation_score(val), val["loss"]
        what = "val AUC" if val["auc"] is not None else "val accuracy"
        if score > self.score:
            reason = f"highest {what}"
        elif score == self.score and loss < self.loss:
            reason = f"{what} tied with epoch {self.epoch}, lower val loss"
        else:
            return False
        self.epoch, self.score, self.loss, self.reason, self.val = epoch, score, loss, reason, val
        return True


@dataclass
class RunState:
    """What an epoch changes and last.pt keeps, so that a resumed run continues exactly."""
    history: list[dict] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)
    samples: int = 0                # trained samples, all epochs
    seconds: float = 0.0            # training seconds, all epochs
    first_epoch: int = 0
    diverged_epoch: int | None = None   # the epoch after which loss or weights were not finite: the run's end


@dataclass
class Training:
    """Everything ``train`` sets up before the first epoch."""
    cfg: TrainConfig
    reader: StoreReader
    spec: ModelSpec
    device: torch.device
    out: Path
    info: dict[str, Any]
    train_data: SplitData
    val_data: SplitData
    model: SideNetwork | LinearProbe
    side_input: SideInput
    step: TrainStep
    rng: np.random.Generator
    dropout: torch.Generator            # the model's dropout masks (on its device)
    steps_per_epoch: int
    state: RunState


def train(cfg: TrainConfig, on_epoch: Callable[[dict], None] | None = None,
          on_start: Callable[[dict], None] | None = None,
          on_batch: Callable[[int, int, int], None] | None = None,
          shared: SharedSplits | None = None,
          pictures: Callable[..., list[Path]] = write_evaluation_plots) -> RunMetrics:
    """Train ``cfg.method`` on ``cfg.store``; writes metrics.json, best.pt, last.pt, log.jsonl and the test
    split's ROC and confusion-matrix pictures (test-roc.png, test-confusion.png) to the run dir.

    ``on_start(info)`` gets the data plan (cache decision, sizes) before the first epoch, ``on_epoch(record)``
    each epoch's log record, ``on_batch(epoch, steps done, steps per epoch)`` each training step. A run dir
    holding an unfinished run of the same configuration resumes from its last checkpoint. ``shared``: the
    train/val splits already in shared memory (a sweep's concurrent runs), used when they are cached.
    ``pictures``: what draws the test pictures (``write_evaluation_plots``'s arguments; a sweep's runs in threads
    hand them to its ``PicturePool``)."""
    out = run_folder(cfg)
    with removed_unless_used(out):
        run = set_up(cfg, shared, out)
        try:
            return _train(run, on_epoch, on_start, on_batch, pictures)
        except RuntimeError as e:
            if not helper_process_died(e):
                raise
            raise FptError(f"a store reader died ({e}); the run is kept up to its last whole epoch: continue it with "
                           f"--resume {run.out} (with fewer --workers if the host ran out of memory)") from None
        finally:
            run.step.release()                          # its CUDA graphs, now (see TrainStep.release)


def run_folder(cfg: TrainConfig) -> Path:
    """``--out``, or a new folder runs/<store>-<date>-<time>."""
    return Path(cfg.out or f"runs/{store_stem(cfg.store)}-{datetime.now():%Y%m%d-%H%M%S}")


@contextmanager
def removed_unless_used(out: Path) -> Iterator[None]:
    """The run folder ``out``, removed again if it did not exist before and the block fails before the run wrote
    anything worth keeping (no checkpoint, no metrics, no logged epoch): a run that fails as it starts (an
    out-of-memory device, a store reader that cannot start, Ctrl-C) leaves no empty run behind."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and all(_unused(f) for f in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _unused(path: Path) -> bool:
    """A run file that holds nothing yet: an empty log, or a temporary file of an unfinished write."""
    return path.is_file() and (path.name == "log.jsonl" and path.stat().st_size == 0 or ".tmp" in path.name)


def _train(run: Training, on_epoch: Callable[[dict], None] | None, on_start: Callable[[dict], None] | None,
           on_batch: Callable[[int, int, int], None] | None, pictures: Callable[..., list[Path]]) -> RunMetrics:
    cfg = run.cfg
    if on_start:
        on_start(run.info)
    session: list[tuple[int, float]] = []          # (samples, seconds) of the epochs trained in this call
    with PeakMemory(run.device) as memory, CheckpointWriter() as writer:
        checkpoints = RunCheckpoints(run, writer, cfg.checkpoint_seconds)
        try:
            for epoch in range(run.state.first_epoch, cfg.epochs):
                record = train_epoch(run, epoch, on_batch)
                session.append((record.pop("samples"), record["seconds"]))
                with open(run.out / "log.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
                if record.get("diverged"):              # the run ends: its best epoch before this one is tested
                    run.state.diverged_epoch = epoch
                    break
                checkpoints.epoch_done(epoch)
                if on_epoch:
                    on_epoch(record)
        except BaseException as stop:           # Ctrl-C, an error: resumable from the last whole epoch
            try:
                checkpoints.write()
            except Exception as e:              # noqa: BLE001 - e.g. the device failed: the first error matters
                warnings.warn(f"last.pt not updated after the run stopped ({type(e).__name__}: {e}); "
                              "--resume continues from the previous one", RuntimeWarning, stacklevel=2)
                raise stop from None
            raise
        checkpoints.write(last=False)           # the best model; finish removes last.pt anyway
    return finish(run, memory, session, pictures)


def set_up(cfg: TrainConfig, shared: SharedSplits | None = None, out: Path | None = None) -> Training:
    """Check the store and the configuration, plan the data, build (or restore) model, optimizer and RNGs; the
    run's folder is ``out`` (default: ``run_folder``)."""
    reader = StoreReader(cfg.store)
    reader.require_complete()
    spec = model_spec(reader, cfg)
    device = resolve_device(cfg.device)
    compile = step_compiles(cfg.compile)
    cuda_graph = step_captures(cfg.cuda_graph, device)        # before anything is written
    out = out or run_folder(cfg)
    if (out / "metrics.json").exists():
        raise FptError(f"{out} already holds a finished run; choose another --out")
    resume = _resume_state(out, cfg)
    if resume is None and out.is_dir() and any(not is_run_file(f) for f in out.iterdir()):
        raise FptError(f"{out} holds files that are not a run's; a run writes into a folder of its own: choose "
                       "another --out")
    plan = plan_cache(reader, spec.inputs, cfg.cache, device, cfg.cache_budget_mb,
                      shared_on_device=bool(shared) and all(s.on(device) for s in shared.values()))
    corrupt = exclude_corrupt(reader, spec.inputs, cfg.skip_corrupt, known=cfg.corrupt)
    check_classes_trained(reader)
    n_train = len(reader.split_indices("train"))
    steps_per_epoch = batch_count(n_train, cfg.batch_size, cfg.drop_last)
    if steps_per_epoch == 0:
        raise FptError(f"the train split ({n_train} samples) is smaller than one batch of {cfg.batch_size} "
                       "and the last partial batch is dropped (drop_last); lower --batch-size")
    out.mkdir(parents=True, exist_ok=True)

    train_data, val_data = (open_split(reader, s, spec.inputs, plan.mode, device, cfg.workers, shared)
                            for s in ("train", "val"))
    rng = np.random.default_rng(cfg.seed)
    norm = reader.attrs["normalization"]
    side_input = SideInput(cfg.side_res, norm["mean"], norm["std"], seed=cfg.seed, augment=cfg.augment)
    model = seeded_model(spec, cfg.seed).to(device)
    dropout = torch.Generator(device).manual_seed(cfg.seed)
    use_generator(model, dropout)
    optimizer, schedule = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.epochs * steps_per_epoch, device)
    state = RunState()
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        _set_rng_state(resume["rng"], rng, side_input, dropout, out)
        state = RunState(resume["history"], BestEpoch(**resume["best"]), resume["samples"], resume["seconds"],
                         resume["epoch"] + 1)
    # after the optimizer's state is restored: the step sets the options its kind of step needs (capturable)
    step = TrainStep(model, side_input, optimizer, schedule, compile=compile, cuda_graph=cuda_graph)
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state.history))
    cache = {**plan.as_dict(), "shared": getattr(train_data, "shared", False)}    # MemorySplit: from ``shared``
    info = {"method": spec.method, "cache": cache, "train": len(train_data), "val": len(val_data),
            "device": str(device), "compiled": step.is_compiled, "cuda_graph": cuda_graph,
            "drop_last": cfg.drop_last,
            "resumed_from_epoch": resume["epoch"] if resume else None, "corrupt_skipped": corrupt,
            "dataset_warnings": reader.attrs["dataset"].get("warnings", []),  # recorded at extraction
            "warnings": method_warnings(spec, reader)}
    return Training(cfg, reader, spec, device, out, info, train_data, val_data, model, side_input, step, rng,
                    dropout, steps_per_epoch, state)


def check_classes_trained(reader: StoreReader) -> None:
    """Refuse a store where a class has no train samples: extraction refuses such a dataset before decoding, but
    its ``--on-error skip`` can leave a class without any afterwards (every train image of it unreadable), and a
    run then trained a classifier that never saw the class, reporting metrics as if nothing were wrong."""
    present = np.unique(reader.labels[reader.split == SPLITS.index("train")])
    untrained = [c for i, c in enumerate(reader.classes) if i not in present]
    if untrained:
        raise FptError(f"{reader.path}: class(es) {', '.join(map(repr, untrained))} have no train samples (their "
                       "train images were skipped as unreadable at extraction: the store's skipped.csv lists them), "
                       "so they cannot be learnt; fix those images and extract again")


def train_epoch(run: Training, epoch: int,
                on_batch: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """One epoch: training steps with no host synchronisation (the loss is summed on the device and read once),
    then validation and model selection. Returns the epoch's log record (+ ``samples``)."""
    cfg, state = run.cfg, run.state
    run.model.train()
    start = time.perf_counter()
    # the epoch's augmentation draws, made on the host and copied to the device in one piece
    draws = run.side_input.draw(run.steps_per_epoch, cfg.batch_size).to(run.device)
    loss_sum, samples = torch.zeros((), device=run.device), 0
    batches = run.train_data.batches(cfg.batch_size, shuffle=True, rng=run.rng, drop_last=cfg.drop_last,
                                     reuse=True)
    for i, b in enumerate(batches):
        n = len(b["labels"])
        loss_sum += run.step(b, draws[i, :, :n]) * n
        samples += n
        if on_batch:                                   # counts only: no host synchronisation
            on_batch(epoch, i + 1, run.steps_per_epoch)
    mean_loss = float(loss_sum) / samples                                    # the epoch's one host sync
    seconds = time.perf_counter() - start
    state.samples, state.seconds = state.samples + samples, state.seconds + seconds
    # diverged (e.g. too high an lr): the weights are not finite now; an epoch's last update can make them so with
    # every loss of the epoch finite, which the validation's probabilities then show
    diverged = not math.isfinite(mean_loss)
    if not diverged:
        probs, labels = predict_split(run.model, run.val_data, run.side_input, cfg.batch_size, run.step)
        diverged = not np.isfinite(probs).all()
    if diverged:
        return {"epoch": epoch, "loss": mean_loss, "diverged": True, "seconds": round(seconds, 3),
                "best_epoch": state.best.epoch, "samples": samples}
    val = {**classification_metrics(labels, probs), "loss": cross_entropy(labels, probs)}
    state.best.improved_by(epoch, val)
    record = {"epoch": epoch, "loss": mean_loss, "lr": run.step.schedule.get_last_lr()[0], "val": val,
              "seconds": round(seconds, 3), "best_epoch": state.best.epoch}
    state.history.append(record)
    return {**record, "samples": samples}


class RunCheckpoints:
    """A run's best.pt and last.pt, written by a background ``CheckpointWriter``.

    After each epoch (``epoch_done``) what a resume needs is copied where it is (a GPU copy does not wait for
    the GPU), with the model as best.pt's content when that epoch is the new best. The files are written from
    those copies (``write``) once ``every_s`` seconds have passed since the last write (0: after every epoch),
    when training stops early (Ctrl-C, an error) and, for best.pt, when it ends. So epochs of a fraction of a
    second do not spend their time on files and a resumed run still continues from the last epoch written,
    with the results of an uninterrupted run; a kill -9 loses at most ``every_s`` seconds of training."""

    def __init__(self, run: Training, writer: CheckpointWriter, every_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.run, self.writer, self.every_s, self.clock = run, writer, every_s, clock
        self.written = clock()
        self.best: dict | None = None               # best.pt's content, not yet written
        self.last: dict | None = None               # last.pt's content after the latest epoch, not yet written
        # the device copies those hold, refreshed in place: a pending best.pt keeps its own until a new best
        self.best_copies, self.last_copies = TensorCopies(), TensorCopies()

    def epoch_done(self, epoch: int) -> None:
        run, state = self.run, self.run.state
        identity = {"spec": run.spec.as_dict(), "store": store_identity(run.reader)}
        if state.best.epoch == epoch:
            self.best = {**identity, "model": self.best_copies.refresh(run.model.state_dict()),
                         "config": jsonable(asdict(run.cfg)), "epoch": epoch}
        trained = self.last_copies.refresh({"model": run.model.state_dict(),
                                            "optimizer": run.step.optimizer.state_dict()})
        self.last = {**identity, **trained,
                     "schedule": copy_tensors(run.step.schedule.state_dict()),
                     "rng": _rng_state(run.rng, run.side_input, run.dropout), "history": list(state.history),
                     "best": asdict(state.best), "samples": state.samples, "seconds": state.seconds,
                     "epoch": epoch, "config": comparable_config(run.cfg)}
        if self.clock() - self.written >= self.every_s:
            self.write()

    def write(self, last: bool = True) -> None:
        """Hand what is pending to the writer: best.pt before last.pt, so that a last.pt on disk never names a
        best epoch whose model is not."""
        if self.best is not None:
            self.writer.submit(self.run.out / "best.pt", "best", self.best)
            self.best = None
        if last and self.last is not None:
            self.writer.submit(self.run.out / "last.pt", "last", self.last)
            self.last = None
        self.written = self.clock()


def is_run_file(path: Path) -> bool:
    """Whether ``path`` in a run's folder is one a run writes (checkpoints, log, metrics and plots, and the
    temporary files they are written through)."""
    return path.is_file() and (path.name in ("best.pt", "last.pt", "log.jsonl", "metrics.json")
                               or path.name.startswith("test-") and path.suffix == ".png" or ".tmp" in path.name)


def finish(run: Training, memory: PeakMemory, session: list[tuple[int, float]],
           pictures: Callable[..., list[Path]] = write_evaluation_plots) -> RunMetrics:
    """Test the best checkpoint, write metrics.json, remove last.pt; the run's metrics. A run that diverged
    before its first validated epoch has no checkpoint: its metrics are undefined (None)."""
    cfg, state, device = run.cfg, run.state, run.device
    del run.train_data, run.val_data
    if state.best.epoch < 0:
        test = dict.fromkeys(METRIC_NAMES)
        state.best.val = {**test, "loss": None}
    else:
        run.model.load_state_dict(read_checkpoint(run.out / "best.pt", "best")["model"])
        test_data = open_split(run.reader, "test", run.spec.inputs, "none", device, cfg.workers)
        probs, labels = predict_split(run.model, test_data, run.side_input, cfg.batch_size, run.step)
        test = classification_metrics(labels, probs)
        pictures(run.out / "test", labels, probs, run.reader.classes, title=f"{run.spec.method}, test")
    params = parameter_counts(run.model, lpm_parameters(run.reader.attrs["backbone"]))
    peak_mb = round(memory.peak_mb, 1)
    steady = session[1:]                            # the first epoch of a session includes warm-up and compiling
    steady_samples, steady_seconds = sum(n for n, _ in steady), sum(s for _, s in steady)
    metrics = RunMetrics(
        method=run.spec.method, best_epoch=state.best.epoch, best_reason=state.best.reason, val=state.best.val,
        test=test, params=params,
        efficiency=efficiency(test["auc"], "test_auc", params["ratio_percent"], None if memory.shared else peak_mb,
                              cfg.ft_memory_mb),
        throughput=Throughput(
            train_samples_per_s=round(state.samples / state.seconds, 2) if state.seconds else None,
            steady_train_samples_per_s=round(steady_samples / steady_seconds, 2) if steady_seconds else None,
            peak_memory_mb=peak_mb, memory_kind=memory.kind, memory_baseline_mb=round(memory.baseline_mb, 1),
            device=str(device), compiled=run.step.is_compiled, captured=run.step.is_captured,
            torch_threads=torch.get_num_threads()),
        data=run.info, config=jsonable(asdict(cfg)), store=str(cfg.store), run_dir=str(run.out),
        diverged_epoch=state.diverged_epoch)
    (run.out / "last.pt").unlink(missing_ok=True)
    atomic_write_text(run.out / "metrics.json", json.dumps(metrics.as_dict(), indent=2))
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
    if not (run / "last.pt").exists():
        raise FptError(f"--resume {run}: no unfinished run there (no last.pt)")
    saved = read_checkpoint(run / "last.pt", "last", "--resume")["config"]
    return TrainConfig(**{"device": "auto", **saved, "out": run,
                          **{k: v for k, v in runtime.items() if v is not None}})


def _resume_state(out: Path, cfg: TrainConfig) -> dict | None:
    """The state of an unfinished run in ``out`` (None when there is none); refused if its config differs."""
    last = out / "last.pt"
    if not last.exists():
        return None
    state = read_checkpoint(last, "last", "unfinished run")
    if state.get("config") != comparable_config(cfg):
        theirs, ours = state.get("config") or {}, comparable_config(cfg)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise FptError(f"{out} holds an unfinished run with other settings ({', '.join(diff)}); "
                       "choose another --out or delete it")
    return state


def _rng_state(rng: np.random.Generator, side_input: SideInput, dropout: torch.Generator) -> dict:
    return {"numpy": rng.bit_generator.state, "augment": side_input.generator.get_state(),
            "dropout": dropout.get_state()}


def _set_rng_state(state: dict, rng: np.random.Generator, side_input: SideInput, dropout: torch.Generator,
                   out: Path) -> None:
    if "dropout" not in state:
        raise FptError(f"{out}/last.pt was written by an earlier fpt whose dropout drew from torch's global "
                       "generator: it cannot be resumed with the same results; start the run again")
    rng.bit_generator.state = state["numpy"]
    side_input.generator.set_state(state["augment"])
    dropout.set_state(state["dropout"])


def evaluate_checkpoint(store: Path, checkpoint: Path, split: str = "test", batch_size: int = 32,
                        device: str = "auto", out: Path | None = None) -> Evaluation:
    """Metrics of a saved checkpoint on one split of a store; refuses a checkpoint from another extraction.
    With ``out`` (a .json path) also writes them there, with ``<out stem>-roc.png`` and ``-confusion.png``."""
    reader = StoreReader(store)
    reader.require_complete()
    if split not in SPLITS:
        raise FptError(f"--split {split!r}: choose {', '.join(SPLITS[:-1])} or {SPLITS[-1]}")
    if out is not None:
        if Path(out).suffix.lower() != ".json":
            raise FptError(f"--out {out}: evaluate writes its metrics as .json")
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FptError(f"--out {out}: cannot create its folder ({e.strerror})") from None
    ckpt = load_checkpoint(checkpoint, reader)
    dev = resolve_device(device)
    model = ckpt.model.to(dev)
    data = open_split(reader, split, ckpt.spec.inputs, "none", dev)
    norm = reader.attrs["normalization"]
    side_input = SideInput(ckpt.spec.side_res, norm["mean"], norm["std"])
    probs, labels = predict_split(model, data, side_input, batch_size)
    result = Evaluation(split, len(labels), ckpt.spec.method, classification_metrics(labels, probs))
    if out is not None:
        atomic_write_text(Path(out), json.dumps({**jsonable(asdict(result)), "checkpoint": str(checkpoint),
                                                 "store": str(store)}, indent=2))
        write_evaluation_plots(Path(out).with_suffix(""), labels, probs, reader.classes,
                               title=f"{ckpt.spec.method}, {split}")
    return result

