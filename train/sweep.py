"""``fpt sweep``: the paper's protocol as one command.

1. grid: one run per (learning rate, weight decay) at the base seed; the best by val AUC (val accuracy where
   AUC is undefined) wins, ties to the first in grid order;
2. seeds: the best configuration repeated over ``seeds`` seeds (base seed, base + 1, ...; the grid run is the
   first of them), test metrics reported as mean ± sample std (ddof 1), with PPE/PME of the mean test AUC.

Every run is one dask.distributed task reading the same store (read-only) and writing its own run directory
``<sweep>/runs/lr<lr>-wd<wd>-seed<seed>``. A run whose metrics.json exists is not run again, so a killed
sweep resumes where it stopped (and an unfinished run resumes from its last epoch).

One run at batch 16 leaves most of a GPU idle, so a local scheduler trains several runs at once per GPU
(``runs_per_gpu``: given, or as many as fit the free GPU memory by the step's measured peak plus the cached
split), in one of two ways (``runs_in``):
- ``threads`` (the default on CUDA): dask workers that are threads of this process, each run on a CUDA stream
  of its own. The kernels of different streams of one process run at the same time, so small steps fill the
  GPU together; and there is one CUDA context, no process start, and the cached splits are used as they are.
  The runs share one interpreter lock, so on CUDA what is long and pure Python leaves it: their test pictures
  are drawn by helper processes (``PicturePool``, ``draws_pictures_apart``).
- ``processes`` (the default on CPU, and with ``--compile``: torch.compile is not thread-safe): worker
  processes. Without CUDA MPS the GPU time-slices between their contexts: runs overlap only each other's gaps.
Every run has its own seeded generators (data order, augmentation, dropout; initial weights drawn under a
lock), so a run's results are the same as running its configuration alone, either way. Local runs that cache
their splits use one copy of them (``share_splits``): in this process for threads; for processes in shared
memory (RAM) and on each GPU, which the sweep's process holds and each run maps through a CUDA IPC handle. Where
runs compile their step, the first one runs alone until it has compiled and taken its first step, so that the
others load the compiled step from torch.compile's on-disk caches instead of all compiling it at once.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np
import psutil

from fpt import FptError
from fpt.config import SweepConfig, TrainConfig, resolve_device
from fpt.store import SharedArrays, StoreReader
from fpt.train.data import (PROCESS_SPLITS, TRAINING_SPLITS, ProcessSplit, SharedSplit, SharedSplits,
                            training_bytes)
from fpt.train.files import atomic_write_text
from fpt.train.loop import comparable_config, exclude_corrupt, model_spec
from fpt.train.results import (GridPoint, MeanStd, RunMetrics, SeedResult, SweepSummary, jsonable,
                               validation_score)
from fpt.train.metrics import METRIC_NAMES, efficiency
from fpt.train.plots import PicturePool, write_evaluation_plots, write_sweep_plot
from fpt.train.step import step_captures, step_compiles, stream_of_its_own


@dataclass
class Run:
    stage: str            # "grid" or "seeds"
    lr: float
    weight_decay: float
    seed: int
    cfg: TrainConfig      # the base config with these values and out = <sweep>/runs/<name>

    @property
    def name(self) -> str:
        return run_name(self.lr, self.weight_decay, self.seed)


def run_name(lr: float, weight_decay: float, seed: int) -> str:
    return f"lr{lr:g}-wd{weight_decay:g}-seed{seed}"


def make_run(sweep: SweepConfig, stage: str, lr: float, weight_decay: float, seed: int) -> Run:
    out = sweep.out / "runs" / run_name(lr, weight_decay, seed)
    return Run(stage, lr, weight_decay, seed,
               replace(sweep.train, lr=lr, weight_decay=weight_decay, seed=seed, out=out))


def finished_metrics(run: Run) -> RunMetrics | None:
    """The run's metrics.json when it finished with this configuration; refused when it holds another one."""
    path = run.cfg.out / "metrics.json"
    if not path.exists():
        return None
    metrics = RunMetrics.from_dict(json.loads(path.read_text()))
    if comparable_config(metrics.config) != comparable_config(run.cfg):
        raise FptError(f"{run.cfg.out} holds a run with other settings; use another --out for this sweep")
    return metrics


@dataclass
class ThreadSweep:
    """What a sweep running its runs in threads of this process shares with them: its stop signal and the helper
    processes that draw their pictures (``PicturePool``; None: each run draws its own)."""
    stop: threading.Event
    pictures: PicturePool | None = None


# each such sweep, by ``execute``'s key (dask pickles a task's arguments, so a run is handed the key)
THREAD_SWEEPS: dict[str, ThreadSweep] = {}


class RunStopped(Exception):
    """Raised inside a run in a thread when its sweep stops (another run failed, Ctrl-C): the run writes its
    last.pt and ends, resumable."""


def train_task(cfg: dict[str, Any], threads: int | None, shared: SharedSplits | None = None,
               first_step_event: str | None = None, thread_key: str | None = None) -> RunMetrics:
    """One run on a dask worker (module-level, so workers import it by name); ``first_step_event``: the name of a
    dask ``Event`` to set once the run's first training step is done (compiled and run). ``thread_key``: the run is
    a thread of the sweep's process (``THREAD_SWEEPS[thread_key]``: what stops it, what draws its pictures); on
    CUDA it runs on a stream of its own."""
    import torch

    from fpt.cluster import worker_device
    from fpt.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**cfg)
    event = signalled = None
    if first_step_event:
        from distributed import Event
        event, signalled = Event(first_step_event), []
    sweep = THREAD_SWEEPS[thread_key] if thread_key else None
    stop = sweep.stop if sweep else None
    pictures = sweep.pictures.write_evaluation_plots if sweep and sweep.pictures else write_evaluation_plots

    def on_batch(epoch: int, step: int, steps: int) -> None:
        if event is not None and not signalled:
            event.set()
            signalled.append(True)
        if stop is not None and stop.is_set():
            raise RunStopped("the sweep stopped")

    cfg = replace(cfg, device=worker_device(cfg.device))
    device = resolve_device(cfg.device)
    own = stream_of_its_own(device) if stop is not None and device.type == "cuda" else contextlib.nullcontext()
    with own as stream, torch.cuda.stream(stream):                 # (torch.cuda.stream(None) does nothing)
        return train(cfg, on_batch=on_batch if event or stop else None, shared=shared, pictures=pictures)


def runs_share_process(runs_in: str | None, cuda: bool, compile: bool | None) -> bool:
    """Whether a local sweep trains its concurrent runs as threads of this process: ``runs_in`` as given
    (``--runs-in``, checked by ``sweep_config``), by default on CUDA unless the step compiles."""
    if runs_in is not None:
        return runs_in == "threads"
    return cuda and not step_compiles(compile)


def draws_pictures_apart(cuda: bool, runs: int) -> bool:
    """Whether a sweep's runs in threads hand their pictures to a ``PicturePool``: on CUDA, where the runs'
    Python (they share one interpreter lock), not the cores, limits a sweep. On a CPU the runs' own compute needs
    the cores, and the helper's start (~5 s of CPU on the 2-core dev box: a fork server importing the program)
    cost more than it saved: 12 runs of 2 epochs in threads took 18.3 / 20.4 s with it against 12.6 / 13.6 s."""
    return cuda and runs > 1


CUDA_CONTEXT_MB = 600         # a process's CUDA context and kernels (not counted by max_memory_allocated)
MAX_RUNS_PER_GPU = 8          # processes: each launches its own kernels on a core of its own
MAX_THREAD_RUNS_PER_GPU = 16  # threads: their launches share one interpreter (a captured step is a few launches)


def runs_per_gpu(free_mb: float, step_peak_mb: float, cache_mb: float, cpu_cores: int,
                 threads: bool = False) -> int:
    """How many runs share one GPU: as many as fit 90 % of its free memory, each needing its step's peak (with
    half again for the captured step's graph pool), its cached split and, as a process, a CUDA context; as
    processes at most one per CPU core and ``MAX_RUNS_PER_GPU``, as threads ``MAX_THREAD_RUNS_PER_GPU``."""
    per_run = 1.5 * step_peak_mb + cache_mb + (0 if threads else CUDA_CONTEXT_MB)
    cap = MAX_THREAD_RUNS_PER_GPU if threads else min(cpu_cores, MAX_RUNS_PER_GPU)
    return max(1, min(int(0.9 * free_mb // per_run), cap))


def measured_runs_per_gpu(cfg: TrainConfig, shared_cache: bool = False, threads: bool = False
                          ) -> tuple[int, str]:
    """``runs_per_gpu`` for this machine's first GPU: the step of ``cfg`` measured once here (one step on random
    data of the store's shapes), the train+val split as the GPU cache would hold it: once per run, or once for
    all of them with ``shared_cache``; ``threads``: the runs are threads of this process. (n, why)."""
    import torch

    from fpt.train.memory import StepShape, measure_training_step

    reader = StoreReader(cfg.store)
    spec = model_spec(reader, cfg)
    g = reader.geometry
    device = torch.device("cuda", 0)
    shape = StepShape(cfg.batch_size, g.layers, g.heads, g.k, g.head_dim, g.image_res)
    peak = measure_training_step(spec, shape, device)["peak_mb"]
    torch.cuda.empty_cache()
    cache = training_bytes(reader, spec.inputs) / 2**20
    free = torch.cuda.mem_get_info(device)[0] / 2**20
    cores = os.cpu_count() or 1
    n = runs_per_gpu(free - cache, peak, 0.0, cores, threads) if shared_cache else \
        runs_per_gpu(free, peak, cache, cores, threads)
    return n, (f"step peak {peak:,.0f} MB, cached split {cache:,.0f} MB "
               f"({'one copy for all runs' if shared_cache else 'per run'}), {free:,.0f} MB free")


def execute(runs: list[Run], scheduler: str, on_run: Callable[[Run, RunMetrics, bool], None] | None,
            per_gpu: int | None = None, on_note: Callable[[str], None] | None = None,
            runs_in: str | None = None) -> dict[str, RunMetrics]:
    """Metrics of every run by name: finished ones read back, the others trained as dask tasks (local ones as
    threads of this process or as processes: ``runs_share_process``). ``on_note`` gets how local runs share each
    GPU (how many, why, whether their kernels can overlap)."""
    results, todo = _finished_and_todo(runs, on_run)
    if not todo:
        return results
    from distributed import as_completed, wait

    from fpt.cluster import dask_client, gpu_sharing_note, local_worker_count, mps_running

    reader = StoreReader(runs[0].cfg.store)      # checksum the store once for the sweep, not once per run
    names = model_spec(reader, runs[0].cfg).inputs
    corrupt = exclude_corrupt(reader, names, runs[0].cfg.skip_corrupt)
    device = resolve_device(runs[0].cfg.device)
    cuda = device.type == "cuda"
    local = local_worker_count(scheduler, cuda) is not None
    in_threads = local and runs_share_process(runs_in, cuda, runs[0].cfg.compile)
    # local workers on this machine: the train and val splits read once, for all runs
    share = local and len(todo) > 1 and runs[0].cfg.cache != "none"
    share_gpu = share and cuda and runs[0].cfg.cache in ("auto", "gpu")
    why = "set by --runs-per-gpu"
    if cuda and scheduler == "local" and per_gpu is None:
        per_gpu, why = measured_runs_per_gpu(runs[0].cfg, shared_cache=share_gpu, threads=in_threads)
    if cuda and scheduler == "local" and on_note:
        on_note(f"{gpu_sharing_note(per_gpu, mps_running(), in_threads)} ({why})")
    # The runs compile the same step (lr, weight decay and seed are not in its graphs), and torch.compile keeps
    # what it compiled in on-disk caches that every process of this machine reads. Started together, local runs
    # would each compile it from nothing on the same cores (CPU, small model: 51 s cold against 3 s from the
    # cache); the first one runs alone until it has compiled and taken its first step (not its first epoch, which
    # may be long), then the others find the training step in the cache (its evaluation forward, compiled at the
    # end of the first epoch, reaches the cache about when they need it).
    first_alone = local and len(todo) > 1 and step_compiles(runs[0].cfg.compile)
    with dask_client(scheduler, cuda, per_gpu or 1, processes=not in_threads, tasks=len(todo)) as (client, threads), \
            contextlib.ExitStack() as stack:
        copies = share_splits(reader, names, stack, gpus=share_gpu, in_process=in_threads) if share else None
        thread_key = _start_thread_sweep(stack, len(client.nthreads()), cuda, len(todo)) if in_threads else None
        by_future = {}

        def submit(run: Run, first_step_event: str | None = None):
            cfg = jsonable(asdict(replace(run.cfg, corrupt=corrupt)))
            if local and run.cfg.cache_budget_mb is None:
                # N local runs share this machine's RAM (or each GPU): half of it, split N ways (the RAM once
                # when the runs share one copy of the splits)
                cfg["cache_budget_mb"] = (_free_gpu_mb() / 2 / (per_gpu or 1) if cuda else
                                          psutil.virtual_memory().available / 2**21
                                          / (1 if copies else len(client.nthreads())))
            future = client.submit(train_task, cfg, threads, copies.for_run() if copies else None, first_step_event,
                                   thread_key, key=f"fpt-train-{run.name}-{os.urandom(4).hex()}",
                                   resources={"GPU": 1} if cuda else None, pure=False)
            by_future[future] = run
            return future

        try:
            rest = todo
            if first_alone:
                event = f"fpt-first-step-{os.urandom(4).hex()}"
                first = submit(todo[0], event)
                wait_for_first_step(client, event, first)
                rest = [] if first.status == "error" else todo[1:]          # its error is raised below
            for run in rest:
                submit(run)
            for future in as_completed(list(by_future)):
                run = by_future[future]
                try:
                    metrics = future.result()
                except FptError:
                    client.cancel(list(by_future))
                    raise
                except Exception as e:
                    client.cancel(list(by_future))
                    raise FptError(f"run {run.cfg.out} failed: {type(e).__name__}: {e}") from e
                results[run.name] = metrics
                if on_run:
                    on_run(run, metrics, False)
        except BaseException:
            if thread_key is not None:
                # threads cannot be cancelled: they stop at their next step, writing last.pt (resumable)
                THREAD_SWEEPS[thread_key].stop.set()
                try:
                    wait(list(by_future), timeout=STOP_WAIT_S)
                except Exception:           # noqa: BLE001 - a run still busy: the first error is the one to raise
                    pass
            raise
    return results


STOP_WAIT_S = 120       # how long a stopping sweep waits for its runs in threads to write last.pt and end


def _finished_and_todo(runs: list[Run], on_run: Callable[[Run, RunMetrics, bool], None] | None
                       ) -> tuple[dict[str, RunMetrics], list[Run]]:
    """The metrics of the runs finished before (each reported to ``on_run``), and the runs still to train, each
    once."""
    results, todo = {}, []
    for run in runs:
        done = finished_metrics(run)
        if done is not None:
            results[run.name] = done
            if on_run:
                on_run(run, done, True)
        elif run.name not in {r.name for r in todo}:
            todo.append(run)
    return results, todo


def _start_thread_sweep(stack: contextlib.ExitStack, workers: int, cuda: bool, n_runs: int) -> str:
    """The shared state of a sweep whose runs are threads of this process (``THREAD_SWEEPS``: what stops them,
    what draws their pictures), until ``stack`` closes; its key."""
    key = os.urandom(8).hex()
    # runs that start together end together: enough helpers that their pictures do not queue long
    pictures = (PicturePool(min(n_runs, workers, max(1, (os.cpu_count() or 2) // 2)))
                if draws_pictures_apart(cuda, n_runs) else None)
    if pictures:
        stack.callback(pictures.close)
    THREAD_SWEEPS[key] = ThreadSweep(threading.Event(), pictures)
    stack.callback(THREAD_SWEEPS.pop, key, None)
    return key


def wait_for_first_step(client, event: str, future) -> None:
    """Until the run of ``future`` has set the dask ``Event`` named ``event`` (its first step is done) or has
    ended (failed, or had no epoch left to train)."""
    from distributed import Event

    done = Event(event, client=client)
    while not done.wait(timeout=1) and not future.done():
        pass


class SplitCopies:
    """The train and val splits read once for a sweep's local runs (``share_splits``). For runs in processes: a
    ``SharedArrays`` file each (``host``: split -> (path, spec)) and, on the GPUs in ``gpu`` (index -> split ->
    array name -> tensor), a copy that this process keeps until the sweep's runs are done. For runs in threads
    (``key``): the arrays and tensors themselves, in ``PROCESS_SPLITS[key]``. ``for_run()``: what one run
    opens."""

    def __init__(self, host: dict[str, Any], gpu: dict[int, dict[str, dict[str, Any]]], key: str | None = None):
        self.host, self.gpu, self.key = host, gpu, key

    def for_run(self) -> SharedSplits:
        """The splits for one run: in threads, their key; else the host file, and for each GPU copy a fresh CUDA
        IPC handle per array (torch counts the processes a handle went to, so each run gets its own)."""
        if self.key is not None:
            return {split: ProcessSplit(self.key, split) for split in self.host}
        from torch.multiprocessing.reductions import reduce_tensor

        return {split: SharedSplit(host, {i: {n: reduce_tensor(t) for n, t in splits[split].items()}
                                          for i, splits in self.gpu.items()})
                for split, host in self.host.items()}


def share_splits(reader: StoreReader, names: tuple[str, ...], stack: contextlib.ExitStack,
                 gpus: bool = False, in_process: bool = False) -> SplitCopies | None:
    """The train and val splits read once, when they fit in half the available RAM (else None: each run then
    reads what it caches): into shared memory (``SharedArrays``, removed when ``stack`` closes), or with
    ``in_process`` (runs in threads) kept as they are. With ``gpus``, also a copy on each GPU where they fit in
    half its free memory (freed when ``stack`` closes)."""
    need = training_bytes(reader, names)
    if need > psutil.virtual_memory().available / 2:
        return None
    devices = []
    if gpus:
        import torch

        devices = [i for i in range(torch.cuda.device_count()) if need <= torch.cuda.mem_get_info(i)[0] / 2]
    host, gpu = {}, {i: {} for i in devices}
    stack.callback(gpu.clear)
    for split in TRAINING_SPLITS:
        arrays = reader.read(reader.split_indices(split), names)
        host[split] = arrays if in_process else stack.enter_context(SharedArrays(arrays))
        for i in devices:
            gpu[i][split] = {n: torch.from_numpy(a).to(f"cuda:{i}") for n, a in arrays.items()}
    for i in devices:
        torch.cuda.synchronize(i)           # the copies are whole before any run (on its own stream) reads them
    if not in_process:
        return SplitCopies(host, gpu)
    key = os.urandom(8).hex()
    PROCESS_SPLITS[key] = {s: (host[s], {i: gpu[i][s] for i in devices}) for s in TRAINING_SPLITS}
    stack.callback(PROCESS_SPLITS.pop, key, None)
    return SplitCopies(host, gpu, key)


def _free_gpu_mb() -> float:
    import torch

    return torch.cuda.mem_get_info(0)[0] / 2**20


def mean_std(values: list[float | None]) -> MeanStd:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of the defined values."""
    defined = np.array([v for v in values if v is not None], dtype=float)
    if len(defined) == 0:
        return MeanStd(None, None, 0)
    return MeanStd(float(defined.mean()), float(defined.std(ddof=1)) if len(defined) > 1 else 0.0, len(defined))


def sweep_summary(sweep: SweepConfig, grid: list[Run], seeds: list[Run],
                  results: dict[str, RunMetrics]) -> SweepSummary:
    """The grid with val scores, the chosen configuration, per-seed test metrics, mean ± std."""
    best = seeds[0]
    seed_metrics = [results[r.name] for r in seeds]
    test = {k: mean_std([m.test[k] for m in seed_metrics]) for k in METRIC_NAMES}
    params = seed_metrics[0].params
    memory = mean_std([m.throughput.peak_memory_mb for m in seed_metrics])
    shared_memory = any(m.throughput.memory_kind.endswith("_shared") for m in seed_metrics)  # runs in one process
    return SweepSummary(
        store=str(sweep.train.store), method=seed_metrics[0].method,
        protocol="grid over lr x weight decay at the base seed, best by val AUC; then the best over "
                 f"{len(seeds)} seeds; test mean ± sample std",
        grid=[GridPoint(r.lr, r.weight_decay, r.seed, validation_score(results[r.name].val), results[r.name].val,
                        str(r.cfg.out)) for r in grid],
        best_lr=best.lr, best_weight_decay=best.weight_decay,
        seeds=[SeedResult(r.seed, results[r.name].test, results[r.name].val, results[r.name].best_epoch,
                          results[r.name].best_reason, str(r.cfg.out)) for r in seeds],
        test=test, params=params,
        efficiency=efficiency(test["auc"].mean, "mean test AUC", params["ratio_percent"],
                              None if shared_memory else memory.mean, sweep.train.ft_memory_mb),
        throughput={"train_samples_per_s": mean_std([m.throughput.train_samples_per_s for m in seed_metrics]),
                    "steady_train_samples_per_s": mean_std([m.throughput.steady_train_samples_per_s
                                                            for m in seed_metrics]),
                    "peak_memory_mb": memory, "memory_kind": seed_metrics[0].throughput.memory_kind},
        config={**jsonable(asdict(sweep.train)), "lr": sweep.lrs, "weight_decay": sweep.weight_decays,
                "seeds": sweep.seeds, "scheduler": sweep.scheduler, "out": str(sweep.out)})


def sweep_csv(summary: SweepSummary, grid: list[Run], seeds: list[Run], results: dict[str, RunMetrics]) -> str:
    """One row per run (grid, then seeds), then the seeds' mean and std rows."""
    columns = ["stage", "lr", "weight_decay", "seed", "val_score", *(f"test_{k}" for k in METRIC_NAMES),
               "samples_per_s", "peak_memory_mb", "run_dir"]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for run in [*grid, *seeds]:
        m = results[run.name]
        writer.writerow({"stage": run.stage, "lr": run.lr, "weight_decay": run.weight_decay, "seed": run.seed,
                         "val_score": validation_score(m.val), **{f"test_{k}": m.test[k] for k in METRIC_NAMES},
                         "samples_per_s": m.throughput.train_samples_per_s,
                         "peak_memory_mb": m.throughput.peak_memory_mb, "run_dir": str(run.cfg.out)})
    for stat in ("mean", "std"):
        writer.writerow({"stage": stat, "lr": summary.best_lr, "weight_decay": summary.best_weight_decay,
                         **{f"test_{k}": getattr(summary.test[k], stat) for k in METRIC_NAMES},
                         "samples_per_s": getattr(summary.throughput["train_samples_per_s"], stat),
                         "peak_memory_mb": getattr(summary.throughput["peak_memory_mb"], stat)})
    return out.getvalue()


def run_sweep(sweep: SweepConfig, on_run: Callable[[Run, RunMetrics, bool], None] | None = None,
              on_stage: Callable[[str, int], None] | None = None,
              on_note: Callable[[str], None] | None = None) -> SweepSummary:
    """Run (or resume) the sweep; writes sweep.json, sweep.csv and sweep.png (the grid) into ``sweep.out`` and
    returns the summary (with ``ran``/``skipped``: runs trained now / found finished). ``on_stage(stage, n_runs)``
    announces each stage, ``on_run(run, metrics, skipped)`` reports each run, ``on_note(text)`` how runs share
    a GPU."""
    if sweep.train.device != "auto":                             # (auto: each worker's own device decides)
        step_captures(sweep.train.cuda_graph, resolve_device(sweep.train.device))
    sweep.out.mkdir(parents=True, exist_ok=True)
    counts = {"ran": 0, "skipped": 0}

    def count(run: Run, metrics: RunMetrics, skipped: bool) -> None:
        counts["skipped" if skipped else "ran"] += 1
        if on_run:
            on_run(run, metrics, skipped)

    base_seed = sweep.train.seed
    grid = [make_run(sweep, "grid", lr, wd, base_seed) for lr in sweep.lrs for wd in sweep.weight_decays]
    if on_stage:
        on_stage("grid", len(grid))
    results = execute(grid, sweep.scheduler, count, sweep.runs_per_gpu, on_note, sweep.runs_in)
    if all(validation_score(results[r.name].val) is None for r in grid):
        raise FptError(f"every run of the grid diverged before its first validation (its loss not finite), so "
                       f"none can be chosen: lower --lr (the grid's: {', '.join(f'{lr:g}' for lr in sweep.lrs)}); "
                       f"their logs are under {sweep.out / 'runs'}")
    # max keeps the first of equal scores; a run that diverged before its first validation scores lowest
    best = max(grid, key=lambda r: -1.0 if (score := validation_score(results[r.name].val)) is None else score)
    seeds = [make_run(sweep, "seeds", best.lr, best.weight_decay, base_seed + i) for i in range(sweep.seeds)]
    if on_stage:
        on_stage("seeds", len(seeds) - 1)
    results.update(execute(seeds[1:], sweep.scheduler, count, sweep.runs_per_gpu, on_note, sweep.runs_in))
    summary = sweep_summary(sweep, grid, seeds, results)
    atomic_write_text(sweep.out / "sweep.json", json.dumps(summary.as_dict(), indent=2))
    atomic_write_text(sweep.out / "sweep.csv", sweep_csv(summary, grid, seeds, results))
    write_sweep_plot(sweep.out / "sweep.png", sweep.lrs, sweep.weight_decays,
                     {(r.lr, r.weight_decay): validation_score(results[r.name].val) for r in grid},
                     (best.lr, best.weight_decay), [(r.seed, results[r.name].test["auc"]) for r in seeds])
    return replace(summary, **counts)
