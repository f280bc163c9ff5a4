"""Training speed on one device: the training step eager vs compiled, ``fpt train``'s steady state, the
official-style training loop, and a 12-run sweep concurrently vs one run after another.

Rows (``run(device, small)``; ``python -m fpt.bench.gpu`` calls it for its training table):

* ``step-eager-b{16,64}``, ``step-compiled-b{16,64}``: ``fpt train``'s step (``fpt.train.step.TrainStep``:
  augmentation, forward, backward, clip, AdamW, schedule) on a batch already on the device, not captured;
  median of the timed steps after warm-up (compiling included in the warm-up). Compiled = torch.compile's
  default mode (until 2026-11-27 on CUDA: ``reduce-overhead``, CUDA graphs of the forward and backward).
* ``fpt-train``: ``fpt train`` on a store of the demo task, its steady-state train samples/s (epochs after the
  first; 10 epochs on a GPU, 5 until 2026-11-27) and peak memory from metrics.json, and each epoch's seconds.
* ``loop-*``: ``fpt train``'s epoch taken apart (``loop_rows``): the step on one batch, on the gathered
  batches, the whole timed epoch, the validation; ms per step each, to locate time spent outside the step.
* ``step-graph-b{16,64}``, ``step-graph-compiled-b{16,64}`` (part ``graph``): the same step captured whole as
  one CUDA graph and replayed, ``fpt train``'s step on CUDA since 2026-11-27 (``fpt.train.step.StepGraph``):
  augmentation, forward, backward, clip and AdamW (fused, capturable, its lr a device tensor) inside the graph,
  the batch copied into its static buffers each step; the forward+backward eager or compiled (torch.compile,
  default mode) inside it. (Until then an experiment of this bench, ``WholeStepGraph``, with the same design.)
  On a CPU nothing is captured (the rows are named as the step runs: ``step-eager``, ``step-compiled``).
* ``official-loop``: the official way of feeding the same step (eager): per sample a PNG decode, torchvision
  augmentation on the PIL image and a safetensors load, in DataLoader worker processes; one epoch after a
  warm-up epoch.
* ``sweep-threads`` / ``sweep-processes`` / ``sweep-sequential``: 12 runs (3 learning rates x 2 weight decays
  x 2 seeds) of ``fpt sweep``'s machinery on that store, several at once (``--scheduler local`` on CUDA: runs
  per GPU from memory; ``local:2`` on a CPU) as threads of one process (``--runs-in threads``, the default on
  CUDA since 2026-11-27) and as processes (``--runs-in processes``, named ``sweep-concurrent`` until then),
  against one after another (``local:1``, a process; on CUDA 3 of them, scaled to 12); wall-clock seconds, and
  each run's mean seconds in its training steps (``train_s_per_run``: the rest of a run is set-up, validation,
  test and pictures).

``small``: sizes for a CPU (a ViT-Tiny-shaped LPM at 256 px, side 64, a 64-image store, 2 epochs); otherwise
the paper's setting (ViT-B K/V from 512: L=6, H=12, k=205, d=64; side 128; 16 prompts) and 20-epoch sweeps.

    python -m fpt.bench.train_speed --small            # CPU-sized (rows merge into results/, --parts picks some)
    python -m fpt.bench.train_speed --device cuda      # the paper's setting
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fpt.bench.common import command_line, merge_cases, write_results
from fpt.train.memory import PAPER_SPEC, PeakMemory, StepShape, make_step, step_batch
from fpt.train.model import ModelSpec
from fpt.train.step import GRAPH_WARMUP

SMALL_SPEC = ModelSpec(lpm_dim=192, lpm_heads=3, head_dim=64, patch_size=16, layers=6, n_classes=2, side_res=64,
                       prompts=16, reduction=8)
SMALL_SHAPE = dict(layers=6, heads=3, k=(16 * 16 + 1) // 5, head_dim=64, image_res=128)   # ViT-Tiny at 256 px
PAPER_SHAPE = dict(layers=6, heads=12, k=205, head_dim=64, image_res=256)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setting(small: bool, batch: int) -> tuple[ModelSpec, StepShape]:
    """The side network and the batch's data shape: CPU-sized (``small``) or the paper's."""
    return SMALL_SPEC if small else PAPER_SPEC, StepShape(batch_size=batch, **(SMALL_SHAPE if small else PAPER_SHAPE))


def step_row(device: torch.device, batch: int, compile: bool, small: bool, cuda_graph: bool = False,
             reps: int = 35) -> dict:
    """Samples/s (median step, each ended by a synchronisation) and peak memory of ``fpt train``'s step on a
    batch already on ``device``: eager or compiled, captured as one CUDA graph or not. The warm-up (compiling,
    the eager steps before a capture and the capture) is timed apart."""
    spec, shape = setting(small, batch)
    warmup = GRAPH_WARMUP + 1
    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        step = make_step(spec, device, compile=compile, steps=warmup + reps, cuda_graph=cuda_graph)
        data = step_batch(spec, shape, device)
        draws = step.side_input.draw(warmup + reps, batch).to(device)
        start = time.perf_counter()
        for i in range(warmup):
            step(data, draws[i])
        _sync(device)
        warm_s = time.perf_counter() - start
        times = []
        for i in range(warmup, warmup + reps):
            t = time.perf_counter()
            loss = step(data, draws[i])
            _sync(device)
            times.append(time.perf_counter() - t)
        finite = bool(torch.isfinite(loss).item())
    median = statistics.median(times)
    kind = ("graph-" if step.is_captured else "") + ("compiled" if step.is_compiled else "eager")
    return {"name": f"step-{kind.replace('graph-eager', 'graph')}-b{batch}", "batch": batch,
            "samples_per_s": round(batch / median, 1), "step_ms": round(median * 1e3, 3),
            "warmup_s": round(warm_s, 2), "peak_mb": round(memory.peak_mb, 1), "memory_kind": memory.kind,
            "compiled": step.is_compiled, "captured": step.is_captured, "loss_finite": finite,
            "steps_timed": reps}


def bench_store(small: bool):
    """The demo task extracted (cached under bench/.work): ViT-Tiny at 256 px, 64 train images (small), or
    ViT-B at 512 px, 384 train images."""
    from fpt.bench.data import ensure_dataset
    return (ensure_dataset("vit_tiny_patch16_224", 256, 64, image_res=128) if small
            else ensure_dataset("vit_base_patch16_224", 512, 384))


def train_config_for(store, device: torch.device, small: bool, out: Path, epochs: int, **overrides):
    from fpt.config import train_config
    options = dict(side_res=64 if small else 128, prompts=16, batch_size=16, epochs=epochs, device=str(device),
                   out=out, seed=0)
    return train_config(store, None, **{**options, **overrides})


def fpt_train_row(device: torch.device, small: bool, work: Path) -> dict:
    from fpt.train import train
    data = bench_store(small)
    epochs = 3 if small else 10         # the steady rate: epochs 1-9 (each is 24 steps of a 384-image store)
    m = train(train_config_for(data.store, device, small, work / "fpt-train", epochs))
    t = m.throughput
    log = [json.loads(line) for line in (Path(m.run_dir) / "log.jsonl").read_text().splitlines()]
    return {"name": "fpt-train", "batch": 16, "samples_per_s": t.steady_train_samples_per_s,
            "epoch_seconds": [r["seconds"] for r in log],      # the steady rate counts all but the first
            "whole_run_samples_per_s": t.train_samples_per_s, "peak_mb": t.peak_memory_mb,
            "memory_kind": t.memory_kind, "compiled": t.compiled, "epochs": epochs,
            "cache": m.data["cache"]["mode"], "train_samples": m.data["train"]}


class _OfficialSamples(torch.utils.data.Dataset):
    """The official loader's samples for a DataLoader: (image, keys, values, label) per index."""

    def __init__(self, official):
        self.official = official

    def __len__(self) -> int:
        return len(self.official)

    def __getitem__(self, i: int):
        return self.official.sample(i)


def official_loop_row(device: torch.device, small: bool, workers: int) -> dict:
    """One epoch (after a warm-up epoch) of the official way of feeding the same training step."""
    from fpt.bench.data_path import AlreadyAugmented
    from fpt.bench.official import OfficialTrainData
    from fpt.store import StoreReader
    from fpt.train.loop import model_spec
    from fpt.train.model import build_model
    from fpt.train.step import TrainStep, make_optimizer

    data = bench_store(small)
    reader = StoreReader(data.store)
    cfg = train_config_for(data.store, device, small, Path("unused"), 2)
    norm = reader.attrs["normalization"]
    official = OfficialTrainData(*data.train_images(), data.official, cfg.side_res, norm["mean"], norm["std"])
    loader = torch.utils.data.DataLoader(_OfficialSamples(official), batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    torch.manual_seed(0)
    with PeakMemory(device) as memory:
        model = build_model(model_spec(reader, cfg)).to(device)
        optimizer, schedule = make_optimizer(model, cfg.lr, cfg.weight_decay, 2 * len(loader), device)
        step = TrainStep(model, AlreadyAugmented(), optimizer, schedule)
        seconds = []
        for _ in range(2):
            start, samples = time.perf_counter(), 0
            for images, keys, values, labels in loader:
                batch = {"images": images, "keys": keys, "values": values, "labels": labels}
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                step(batch, torch.zeros(0, len(labels)))
                samples += len(labels)
            _sync(device)
            seconds.append(time.perf_counter() - start)
    return {"name": "official-loop", "batch": cfg.batch_size, "samples_per_s": round(samples / seconds[-1], 1),
            "peak_mb": round(memory.peak_mb, 1), "memory_kind": memory.kind, "compiled": False,
            "workers": workers, "train_samples": samples}


def loop_rows(device: torch.device, small: bool, work: Path) -> list[dict]:
    """Where an epoch of ``fpt train`` spends its time beyond the step, on one run set up as ``fpt train`` sets
    it up (its store, config, compiled step) after two warm-up epochs, in ms per step:

    * ``loop-one-batch``: the step on one gathered batch over and over (as the ``step-*`` rows);
    * ``loop-gathered``: the step on the epoch's batches as the split gathers them, nothing else;
    * ``loop-gathered-after-validation``: the same right after a validation pass (untimed): what switching
      from the compiled evaluation forward back to the training step costs (with CUDA graphs, a re-recording
      would show here and not in ``loop-gathered``);
    * ``loop-epoch``: ``train_epoch``'s own timed part (draws, gathering, steps, the loss sum), run right after
      another epoch's validation and checkpoints, as in a run (the checkpoints are written by a background
      thread during this epoch);
    * ``loop-epoch-flushed``: the same once the previous epoch's checkpoints are on disk (no writer running);
    * ``loop-validation``: the validation forward over the val split (outside the timed part of an epoch);
    * on CUDA, ``loop-host-issue`` and ``loop-device``: the gathered steps' host time to issue their work while
      the GPU is held busy (nothing waits for the device: what launching costs the host, which a CUDA graph of
      the whole step would save), and the device's time to run that work back to back (CUDA events: the step's
      floor on this GPU). A step whose host time exceeds its device time is launch-bound.
    """
    from fpt.train.files import CheckpointWriter
    from fpt.train.loop import RunCheckpoints, predict_split, set_up, train_epoch

    data = bench_store(small)
    run = set_up(train_config_for(data.store, device, small, work / "fpt-loop", epochs=5))
    bs, rng, steps = run.cfg.batch_size, np.random.default_rng(0), run.steps_per_epoch
    draws = run.side_input.draw(steps, bs).to(device)

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    def gathered():
        for i, b in enumerate(run.train_data.batches(bs, shuffle=True, rng=rng, drop_last=True)):
            run.step(b, draws[i])

    rows = []
    with CheckpointWriter() as writer:
        checkpoints = RunCheckpoints(run, writer, every_s=0)           # files after every epoch

        def epoch(i: int) -> float:
            seconds = train_epoch(run, i)["seconds"]
            checkpoints.epoch_done(i)
            return seconds

        for i in range(2):
            epoch(i)
        one = next(run.train_data.batches(bs, shuffle=True, rng=rng, drop_last=True))
        def validate():
            return predict_split(run.model, run.val_data, run.side_input, bs, run.step)

        run.model.train()       # validation leaves the model in eval mode (train_epoch sets train mode itself)
        seconds = {"loop-one-batch": (timed(lambda: [run.step(one, draws[i]) for i in range(steps)]), steps),
                   "loop-gathered": (timed(gathered), steps)}
        validate()
        run.model.train()
        seconds["loop-gathered-after-validation"] = (timed(gathered), steps)
        epoch(2)
        seconds["loop-epoch"] = (epoch(3), steps)
        writer.flush()
        seconds["loop-epoch-flushed"] = (epoch(4), steps)
        seconds["loop-validation"] = (timed(validate), -(-len(run.val_data) // bs))
        if device.type == "cuda":
            run.model.train()
            host, on_device = host_and_device_seconds(gathered, device)
            seconds["loop-host-issue"], seconds["loop-device"] = (host, steps), (on_device, steps)
    for name, (s, n) in seconds.items():
        rows.append({"name": name, "batch": bs, "steps": n, "ms_per_step": round(1e3 * s / n, 3),
                     "samples_per_s": round(n * bs / s, 1), "compiled": run.step.is_compiled, "peak_mb": None})
    return rows


def host_and_device_seconds(fn, device: torch.device, hold_s: float = 1.0) -> tuple[float, float]:
    """``fn()``'s host seconds with the GPU held busy for about ``hold_s`` first (``torch.cuda._sleep``), so that
    none of its calls waits for the device, and the device's seconds for the work it queued, which then runs back
    to back (CUDA events from the end of the hold). A host time near ``hold_s`` means ``fn`` waited for the device
    (a synchronisation) and the device time includes idle gaps."""
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(hold_s * 2e9))                # cycles: ~1 s at an H100's ~2 GHz
    start.record()
    t = time.perf_counter()
    fn()
    host = time.perf_counter() - t
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end) / 1e3


SWEEPS = ("threads", "processes", "sequential")


def sweep_rows(device: torch.device, small: bool, work: Path, sequential_runs: int | None = None,
               sweeps: tuple[str, ...] = SWEEPS) -> list[dict]:
    """12 runs (3 lr x 2 weight decay x 2 seeds) several at once vs one after another (``sweeps``: which of
    ``SWEEPS``; a speed-up is given where the sequential one runs). One after another,
    only the first ``sequential_runs`` of them are run (default: all on a CPU, 3 on CUDA, so that the sweep fits
    what is left of a lease; in lease 4 each run still compiled its step) and ``seconds`` is extrapolated to the
    12: the measured
    wall time (start, those runs, shutdown) plus each missing run at the median time between two runs finishing
    (the runs differ only in lr, weight decay and seed: the same work each); the row says how many ran. Each side
    starts with empty torch.compile caches (inductor's and Triton's, in folders of its own), as on a machine that
    has not compiled this step before: the side measured second would otherwise load what the first compiled."""
    import os
    from unittest.mock import patch

    from fpt.cluster import mps_running
    from fpt.config import SweepConfig
    from fpt.train.sweep import execute, make_run

    data = bench_store(small)
    epochs = 2 if small else 20
    rows = []
    concurrent = "local" if device.type == "cuda" else "local:2"
    sequential_runs = sequential_runs or (12 if small or device.type != "cuda" else 3)
    kinds = {"threads": ("sweep-threads", concurrent, "threads"),
             "processes": ("sweep-processes", concurrent, "processes"),
             "sequential": ("sweep-sequential", "local:1", "processes")}
    for name, scheduler, runs_in in (kinds[k] for k in SWEEPS if k in sweeps):
        base = train_config_for(data.store, device, small, None, epochs)
        sweep = SweepConfig(base, [1e-4, 5e-4, 1e-3], [0.0, 0.05], 2, work / name, scheduler, runs_in=runs_in)
        runs = [make_run(sweep, "grid", lr, wd, seed) for lr in sweep.lrs for wd in sweep.weight_decays
                for seed in (0, 1)]
        ran = runs if scheduler != "local:1" else runs[:sequential_runs]
        caches = {variable: str(work / f"{name}-{variable.lower()}") for variable in
                  ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}          # read by the workers it starts
        finished, notes = [], []
        start = time.perf_counter()
        with patch.dict(os.environ, caches):
            results = execute(ran, scheduler, lambda *_: finished.append(time.perf_counter() - start),
                              runs_in=runs_in, on_note=lambda text: notes.append(text))
        seconds = time.perf_counter() - start
        if len(ran) < len(runs):
            gaps = [b - a for a, b in zip(finished, finished[1:])]
            seconds += (len(runs) - len(ran)) * statistics.median(gaps)
        samples = sum(m.data["train"] for m in results.values()) * epochs * len(runs) / len(ran)
        # each run's seconds in its epochs' training steps (validation, set-up and test excluded): against the
        # wall time, what the runs' fixed costs and their overlap come to
        train_s = [m.data["train"] // base.batch_size * base.batch_size * epochs / m.throughput.train_samples_per_s
                   for m in results.values()]
        rows.append({"name": name, "batch": 16, "runs": len(runs), "runs_timed": len(ran), "epochs": epochs,
                     "scheduler": scheduler, "runs_in": runs_in, "seconds": round(seconds, 1),
                     "train_s_per_run": round(statistics.mean(train_s), 2),
                     "samples_per_s": round(samples / seconds, 1), "peak_mb": None,
                     "mps": mps_running() if device.type == "cuda" else None, "note": " ".join(notes) or None})
    for row in rows[:-1] if "sequential" in sweeps else ():
        row["speedup_vs_sequential"] = round(rows[-1]["seconds"] / row["seconds"], 2)
    return rows


def run(device: torch.device | str, small: bool, workers: int | None = None,
        parts: tuple[str, ...] = ("step", "train", "loop", "official", "sweep"),
        sweeps: tuple[str, ...] = SWEEPS) -> list[dict]:
    """The training table's rows for ``device`` (see the module docstring)."""
    device = torch.device(device)
    workers = workers if workers is not None else (2 if small else 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fpt-train-speed-") as tmp:
        work = Path(tmp)
        for part in parts:                                  # in the order asked: a lease may end before the last
            if part == "step":
                new = (step_row(device, batch, compile, small, reps=10 if small else 35)    # lazily: each row
                       for batch in (16, 64) for compile in (False, True))                  # printed when done
            elif part == "graph":           # fpt train's step on CUDA (on a CPU: nothing to capture)
                new = (_row_or_error(f"step-graph{'-compiled' if compile else ''}-b{batch}", step_row, device,
                                     batch, compile, small, cuda_graph=device.type == "cuda",
                                     reps=10 if small else 35) for batch in (16, 64) for compile in (False, True))
            elif part == "train":
                new = [fpt_train_row(device, small, work)]
            elif part == "official":
                new = [official_loop_row(device, small, workers)]
            elif part == "loop":
                new = loop_rows(device, small, work)
            elif part == "sweep":
                new = sweep_rows(device, small, work, sweeps=sweeps)
            else:
                raise ValueError(f"unknown part {part!r}: step, graph, train, loop, official, sweep")
            for row in new:
                rows.append(row)
                print(json.dumps(row), flush=True)
    for row in rows:
        row["device"] = str(device)
    return rows


def _row_or_error(name: str, fn, *args, **kwargs) -> dict:
    """``fn``'s row, or a row naming its error (an experiment that fails on a device reports, the rest goes on)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:      # noqa: BLE001
        return {"name": name, "error": f"{type(e).__name__}: {e}"[:300], "peak_mb": None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="CPU-sized models, store and sweep")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the official loop")
    p.add_argument("--parts", default="step,train,loop,official,sweep")
    p.add_argument("--sweeps", default=",".join(SWEEPS), help="the sweep part's kinds: " + ", ".join(SWEEPS))
    args = p.parse_args(argv)
    sweeps = tuple(args.sweeps.split(","))
    if unknown := set(sweeps) - set(SWEEPS):
        p.error(f"unknown --sweeps {', '.join(sorted(unknown))}: {', '.join(SWEEPS)}")
    rows = run(args.device, args.small, args.workers, tuple(args.parts.split(",")), sweeps)
    name = f"train_speed-{args.device.split(':')[0]}{'-small' if args.small else ''}"
    for row in rows:
        row["command"] = command_line("fpt.bench.train_speed")
    out = write_results(name, "fpt.bench.train_speed", cases=merge_cases(name, rows, ("name", "device")),
                        torch_threads=torch.get_num_threads())
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
