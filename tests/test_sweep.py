"""fpt sweep: the paper's protocol (grid on val AUC, best over seeds, mean ± std) as dask.distributed tasks on a
2-process LocalCluster, resuming by skipping finished runs; config and scheduler parsing; the CLI table."""
import csv
import json
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fpt import FptError
from fpt.cli import app
from fpt.config import sweep_config
from fpt.cluster import local_worker_count
from fpt.train.results import MeanStd
from fpt.train.sweep import mean_std, run_sweep
from tests.conftest import micro_config, write_image_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from fpt.extract import extract

    root = tmp_path_factory.mktemp("sweep")
    out = root / "micro.zarr"
    extract(micro_config(write_image_folder(root / "data", {"train": 6, "val": 3, "test": 3}), out))
    return out


TINY = dict(side_res=16, epochs=1, batch_size=4, prompts=3, device="cpu")


def test_sweep_config_from_pipelines_and_options(tmp_path):
    store = tmp_path / "cmmd.zarr"
    cfg = sweep_config(store)
    assert cfg.lrs == [0.00005, 0.0001, 0.0002] and cfg.weight_decays == [0.05, 0.1] and cfg.seeds == 5
    assert cfg.scheduler == "local" and cfg.out.as_posix() == "sweeps/cmmd-fpt+"
    cfg = sweep_config(store, lr="1e-3,2e-3", weight_decay="0", seeds=2, scheduler="local:3", method="side-only")
    assert cfg.lrs == [0.001, 0.002] and cfg.weight_decays == [0.0] and cfg.train.method == "side-only"
    assert cfg.out.as_posix() == "sweeps/cmmd-side-only"
    assert cfg.runs_in is None and sweep_config(store, runs_in="threads", scheduler="local:2").runs_in == "threads"
    for bad, message in [(dict(lr="1e-3,x"), "--lr '1e-3,x'"), (dict(lr="1e-3,1e-3"), "distinct"),
                         (dict(lr="-1"), "must be positive"), (dict(lr="1e-3,nan"), "--lr nan: must be a finite"),
                         (dict(weight_decay="0.1,-1"), "--weight-decay non-negative"), (dict(seeds=0), "--seeds 0"),
                         (dict(runs_in="threads", scheduler="local:abc"), "expected local, local:N"),
                         (dict(scheduler="tcp://host:port"), "not a dask scheduler address"),
                         (dict(runs_in="fibers"), "--runs-in 'fibers': choose threads or processes"),
                         (dict(runs_in="threads", scheduler="tcp://10.0.0.1:8786"), "needs a local scheduler"),
                         (dict(runs_in="threads", compile=True), "torch.compile is not thread-safe")]:
        with pytest.raises(FptError, match=message):
            sweep_config(store, **bad)
    good = sweep_config(store)
    for bad, message in [(dict(seeds=0), "--seeds 0"), (dict(runs_per_gpu=0), "--runs-per-gpu 0"),
                         (dict(scheduler="local:0"), "expected local, local:N")]:
        with pytest.raises(FptError, match=message):        # a SweepConfig built by a program is checked too
            replace(good, **bad)


def test_scheduler_parsing():
    assert local_worker_count("local:3", cuda=False) == 3
    assert local_worker_count("local", cuda=False) >= 1
    assert local_worker_count("tcp://10.0.0.1:8786", cuda=False) is None
    for bad in ("local:0", "local:x", "local:1_000", "local:\u0663", "local: 2", "local:"):   # ASCII digits only
        with pytest.raises(FptError, match="expected local, local:N"):
            local_worker_count(bad, cuda=False)


def test_local_worker_counts_follow_the_cores_or_the_gpus(monkeypatch):
    """``local``: on a CPU one worker per two cores, at least one (a one-core machine, or one whose count is
    unknown); on CUDA ``per_gpu`` workers for every GPU (at least one GPU's worth)."""
    from fpt import cluster

    for cores, want in ((1, 1), (None, 1), (2, 1), (3, 1), (8, 4), (64, 32)):
        monkeypatch.setattr(cluster.os, "cpu_count", lambda: cores)
        assert local_worker_count("local", cuda=False) == want, cores
    for gpus, per_gpu, want in ((1, 1, 1), (3, 1, 3), (3, 2, 6), (2, 4, 8), (0, 3, 3)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        assert local_worker_count("local", cuda=True, per_gpu=per_gpu) == want, (gpus, per_gpu)
    assert local_worker_count("local:5", cuda=True, per_gpu=4) == 5                  # N given: N workers


def test_a_local_cluster_starts_no_more_workers_than_there_are_tasks():
    """`--scheduler local:40` for a sweep of 3 runs (or an extraction of 2 shards) started 40 worker processes, each
    importing torch, 37 of them to do nothing: on a small machine enough to run out of memory."""
    from fpt.cluster import dask_client

    with dask_client("local:40", cuda=False, processes=False, tasks=3) as (client, _):
        assert len(client.nthreads()) == 3
    with dask_client("local:2", cuda=False, processes=False, tasks=0) as (client, _):
        assert len(client.nthreads()) == 1


def test_local_workers_take_the_gpus_in_turn(monkeypatch):
    """On a machine with several GPUs, LocalCluster worker i (workers are named 0..N-1) runs on GPU i % count, so
    the workers spread evenly over the GPUs (each GPU gets every count-th worker), whatever N is; an explicit
    device, a single GPU or a task outside a worker keeps the device asked for."""
    import distributed

    from fpt.cluster import worker_device

    gpus, worker = 3, SimpleNamespace(name=0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed, "get_worker", lambda: worker)
    placed = []
    for i in range(2 * gpus + 1):
        worker.name = i
        placed.append(worker_device("cuda"))
    assert placed == [f"cuda:{i % gpus}" for i in range(2 * gpus + 1)]
    assert Counter(placed[:2 * gpus]) == {f"cuda:{g}": 2 for g in range(gpus)}      # every GPU twice
    assert worker_device("cuda:1") == "cuda:1" and worker_device("cpu") == "cpu"
    worker.name = "tcp-worker"                                   # a worker of a running scheduler, named otherwise
    assert worker_device("cuda") == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    worker.name = 2
    assert worker_device("cuda") == "cuda"


def test_cli_refuses_a_bad_scheduler_before_any_work(store, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--store", str(store), "--scheduler", "local:0", "--out",
                                      str(tmp_path / "s"), "--device", "cpu"])
    assert result.exit_code == 2 and "expected local, local:N" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
    result = CliRunner().invoke(app, ["sweep", "--store", str(store), "--cuda-graph", "--out", str(tmp_path / "g"),
                                      "--device", "cpu"])
    assert result.exit_code == 2 and "--cuda-graph needs a CUDA device" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "g").exists()


def test_sweep_takes_checkpoint_seconds_for_its_runs(store, tmp_path, monkeypatch):
    """A sweep run killed mid-way restarts from its last.pt when the sweep is run again: how often that is written
    is the sweep's option too (it had only the default, 30 s)."""
    from fpt.train import sweep as sweep_module

    given = []

    def captured(cfg, **kwargs):
        given.append(cfg)
        raise FptError("captured")

    monkeypatch.setattr(sweep_module, "run_sweep", captured)
    for option, want in (([], 30.0), (["--checkpoint-seconds", "0"], 0.0), (["--checkpoint-seconds", "5"], 5.0)):
        result = CliRunner().invoke(app, ["sweep", "--store", str(store), "--out", str(tmp_path / "s"), "--device",
                                          "cpu", *option])
        assert result.exit_code == 2 and "captured" in result.output, result.output
        assert given[-1].train.checkpoint_seconds == want


def test_a_failing_run_is_the_sweeps_one_error_line_without_dasks_report_of_it(store, tmp_path):
    """A run that fails on bad input (here its folder holds a file of the user's) ends the sweep with one error line;
    dask's own report of the failed task ("Compute Failed" with the task's traceback) is not printed before it."""
    import subprocess
    import sys

    run = tmp_path / "s" / "runs" / "lr0.001-wd0-seed0"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "fpt.cli", "sweep", "--store", str(store), "--lr", "1e-3",
                             "--weight-decay", "0", "--seeds", "1", "--side-res", "16", "--epochs", "1",
                             "--device", "cpu", "--scheduler", "local:1", "--out", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "holds files that are not a run's" in result.stderr, result.stderr
    assert "Compute Failed" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert (run / "notes.txt").read_text() == "mine"


def test_mean_and_sample_std():
    values = [0.8, 0.9, 0.85, None]
    got = mean_std(values)
    assert got.mean == pytest.approx(statistics.mean([0.8, 0.9, 0.85]))
    assert got.std == pytest.approx(statistics.stdev([0.8, 0.9, 0.85])) and got.n == 3
    assert mean_std([0.7]) == MeanStd(0.7, 0.0, 1) and mean_std([None]).mean is None


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as c:
        yield c


def test_sweep_on_a_local_cluster_then_resume(store, tmp_path, cluster):
    cfg = sweep_config(store, lr="1e-3,3e-3", weight_decay="0,0.05", seeds=3, scheduler=cluster.scheduler_address,
                       out=tmp_path / "sweep", **TINY)
    seen = []
    summary = run_sweep(cfg, on_run=lambda run, metrics, skipped: seen.append((run.name, skipped)))
    assert summary.ran == 4 + 2 and summary.skipped == 0                   # grid 2x2, then 2 more seeds
    assert sorted(seen) == sorted((name, False) for name in {s for s, _ in seen}) and len(seen) == 6
    runs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "sweep" / "runs").glob("*/metrics.json")}
    assert len(runs) == 6

    # the best grid point by val score (first in grid order on ties) is the one repeated over seeds
    def val(m):
        return m["val"]["auc"] if m["val"]["auc"] is not None else m["val"]["acc"]
    grid = [f"lr{lr:g}-wd{wd:g}-seed0" for lr in (0.001, 0.003) for wd in (0, 0.05)]
    best = max(grid, key=lambda name: val(runs[name]))
    chosen = runs[best]["config"]
    assert (summary.best_lr, summary.best_weight_decay) == (chosen["lr"], chosen["weight_decay"])
    seeds = [best.replace("seed0", f"seed{s}") for s in range(3)]
    assert [s.run_dir.split("/")[-1] for s in summary.seeds] == seeds
    for k in ("auc", "acc", "f1"):
        values = [runs[name]["test"][k] for name in seeds]
        assert summary.test[k].mean == pytest.approx(statistics.mean(values))
        assert summary.test[k].std == pytest.approx(statistics.stdev(values))
    assert summary.efficiency["ppe"] is not None and summary.efficiency["pme"] is None
    assert {r.seed for r in summary.seeds} == {0, 1, 2}
    written = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert written == summary.as_dict()
    assert written["best"] == {"lr": summary.best_lr, "weight_decay": summary.best_weight_decay}
    assert written["test"]["auc"] == {"mean": summary.test["auc"].mean, "std": summary.test["auc"].std, "n": 3}
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [r["stage"] for r in rows] == ["grid"] * 4 + ["seeds"] * 3 + ["mean", "std"]
    assert float(rows[-2]["test_auc"]) == pytest.approx(summary.test["auc"].mean)
    assert Image.open(tmp_path / "sweep" / "sweep.png").size[0] > 100          # the grid's picture

    # re-running skips every finished run: nothing is trained or rewritten, no cluster is needed
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "runs").glob("*/metrics.json")}
    again = run_sweep(sweep_config(store, lr="1e-3,3e-3", weight_decay="0,0.05", seeds=3, scheduler="tcp://nowhere:1",
                                   out=tmp_path / "sweep", **TINY))
    assert again.ran == 0 and again.skipped == 6 and again.test == summary.test
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    # a killed sweep: a run without metrics.json is trained again, the others are skipped
    (tmp_path / "sweep" / "runs" / seeds[2] / "metrics.json").unlink()
    resumed = run_sweep(cfg)
    assert resumed.ran == 1 and resumed.skipped == 5

    # the CLI shows the finished sweep (nothing left to run) as tables
    result = CliRunner().invoke(app, ["sweep", "--store", str(store), "--out", str(tmp_path / "sweep"), "--lr",
                                      "1e-3,3e-3", "--weight-decay", "0,0.05", "--seeds", "3", "--side-res", "16",
                                      "--epochs", "1", "--batch-size", "4", "--prompts", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mean ± std" in result.output and "0 runs trained, 6 finished before" in result.output

    # the same sweep dir with other settings is refused, not silently mixed
    with pytest.raises(FptError, match="holds a run with other settings"):
        run_sweep(sweep_config(store, lr="1e-3,3e-3", weight_decay="0,0.05", seeds=3, out=tmp_path / "sweep",
                               **{**TINY, "epochs": 2}))


def test_sweep_starts_its_own_local_cluster(store, tmp_path):
    """Streaming with reader processes asked for: inside a (daemonic) dask worker it falls back to a thread."""
    cfg = sweep_config(store, lr="1e-3", weight_decay="0", seeds=1, scheduler="local:1", out=tmp_path / "s",
                       cache="none", workers=2, **TINY)
    summary = run_sweep(cfg)
    assert summary.ran == 1 and summary.test["auc"].n in (0, 1)
    assert (tmp_path / "s" / "runs" / "lr0.001-wd0-seed0" / "best.pt").exists()


def test_each_seed_repeat_trains_with_its_own_seed(store, tmp_path):
    """The seed repeats of the best grid point are runs of their own seed: the configuration each run trained
    with (its metrics.json) has the seed its name and the summary give, and the repeats' trained weights differ,
    so that the mean ± std over seeds measures seed variation (not one run counted several times)."""
    import torch

    cfg = sweep_config(store, lr="1e-3", weight_decay="0", seeds=3, scheduler="local:1", runs_in="threads",
                       out=tmp_path / "sweep", **TINY)
    summary = run_sweep(cfg)
    assert summary.ran == 3 and [r.seed for r in summary.seeds] == [0, 1, 2]
    weights = []
    for r in summary.seeds:
        saved = json.loads((tmp_path / "sweep" / "runs" / f"lr0.001-wd0-seed{r.seed}" / "metrics.json").read_text())
        assert saved["config"]["seed"] == r.seed and saved["run_dir"] == r.run_dir
        weights.append(torch.load(tmp_path / "sweep" / "runs" / f"lr0.001-wd0-seed{r.seed}" / "best.pt",
                                  weights_only=True)["model"])
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)


def test_runs_per_gpu_fit_free_memory_and_cores():
    from fpt.train.sweep import CUDA_CONTEXT_MB, MAX_RUNS_PER_GPU, runs_per_gpu

    per_run = 1.5 * 400 + 1000 + CUDA_CONTEXT_MB
    assert runs_per_gpu(free_mb=5 * per_run / 0.9, step_peak_mb=400, cache_mb=1000, cpu_cores=16) == 5
    assert runs_per_gpu(free_mb=80_000, step_peak_mb=400, cache_mb=1000, cpu_cores=3) == 3
    assert runs_per_gpu(free_mb=10**7, step_peak_mb=400, cache_mb=1000, cpu_cores=64) == MAX_RUNS_PER_GPU
    assert runs_per_gpu(free_mb=100, step_peak_mb=400, cache_mb=1000, cpu_cores=16) == 1
    # as threads of one process: no CUDA context per run, and not one core each
    from fpt.train.sweep import MAX_THREAD_RUNS_PER_GPU
    assert runs_per_gpu(free_mb=5 * (1.5 * 400 + 1000) / 0.9, step_peak_mb=400, cache_mb=1000, cpu_cores=2,
                        threads=True) == 5
    assert runs_per_gpu(free_mb=10**7, step_peak_mb=400, cache_mb=0, cpu_cores=2,
                        threads=True) == MAX_THREAD_RUNS_PER_GPU > MAX_RUNS_PER_GPU


def test_runs_share_the_process_on_cuda_unless_they_compile_or_are_told():
    from fpt.train.sweep import runs_share_process

    assert runs_share_process(None, cuda=True, compile=None) and not runs_share_process(None, cuda=True, compile=True)
    assert not runs_share_process(None, cuda=False, compile=None)
    assert runs_share_process("threads", cuda=False, compile=None)
    assert not runs_share_process("processes", cuda=True, compile=None)


def test_runs_in_threads_draw_their_pictures_apart_on_cuda_only():
    from fpt.train.sweep import draws_pictures_apart

    assert draws_pictures_apart(cuda=True, runs=2)
    assert not draws_pictures_apart(cuda=False, runs=12) and not draws_pictures_apart(cuda=True, runs=1)


def test_the_gpu_sharing_note_says_whether_kernels_of_concurrent_runs_can_overlap(monkeypatch):
    import psutil

    from fpt.cluster import gpu_sharing_note, mps_running

    class Proc:
        def __init__(self, name):
            self.info = {"name": name}

    monkeypatch.setattr(psutil, "process_iter", lambda attrs: iter([Proc("python"), Proc("nvidia-cuda-mps-control")]))
    assert mps_running()
    monkeypatch.setattr(psutil, "process_iter", lambda attrs: iter([Proc("python")]))
    assert not mps_running()
    assert gpu_sharing_note(1, mps=False) == "one run per GPU"
    assert "kernels overlap" in gpu_sharing_note(4, mps=True) and "time-slices" not in gpu_sharing_note(4, mps=True)
    off = gpu_sharing_note(4, mps=False)
    assert off.startswith("4 runs per GPU as processes") and "time-slices" in off
    assert "nvidia-cuda-mps-control -d" in off
    threads = gpu_sharing_note(4, mps=False, threads=True)
    assert "as threads of this process" in threads and "kernels overlap" in threads and "time-slices" not in threads


def test_concurrent_runs_give_the_results_of_each_run_alone(store, tmp_path, cluster):
    """Two grid runs trained at once (one per worker process) = each configuration trained alone, same seed."""
    import torch

    from fpt.config import train_config
    from fpt.train import train

    cfg = sweep_config(store, lr="1e-3,3e-3", weight_decay="0", seeds=1, scheduler=cluster.scheduler_address,
                       out=tmp_path / "sweep", **TINY)
    summary = run_sweep(cfg)
    assert summary.ran == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                        # as in each single-threaded dask worker
    try:
        for g in summary.grid:
            alone = train(train_config(store, None, out=tmp_path / f"alone-{g.lr}", lr=g.lr,
                                       weight_decay=g.weight_decay, seed=g.seed, **TINY))
            swept = json.loads((tmp_path / "sweep" / "runs" / f"lr{g.lr:g}-wd0-seed0" / "metrics.json").read_text())
            assert swept["val"] == alone.val and swept["test"] == alone.test
            a = torch.load(tmp_path / f"alone-{g.lr}" / "best.pt", weights_only=True)["model"]
            b = torch.load(tmp_path / "sweep" / "runs" / f"lr{g.lr:g}-wd0-seed0" / "best.pt",
                           weights_only=True)["model"]
            assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        torch.set_num_threads(threads)


def test_local_runs_share_one_copy_of_the_splits_and_give_the_results_of_each_run_alone(store, tmp_path):
    """local:2, cached splits: read once into shared memory for both runs; each run's metrics equal its
    configuration trained alone (reading the store itself), and nothing is left in shared memory."""
    import os
    import tempfile
    from pathlib import Path

    import torch

    from fpt.config import train_config
    from fpt.train import train

    def shared_files():
        return {p for d in ("/dev/shm", tempfile.gettempdir()) if Path(d).is_dir()
                for p in Path(d).glob("fpt-shared-*")}

    before = shared_files()
    cfg = sweep_config(store, lr="1e-3,3e-3", weight_decay="0", seeds=1, scheduler="local:2", cache="ram",
                       out=tmp_path / "sweep", **TINY)
    summary = run_sweep(cfg)
    assert summary.ran == 2 and shared_files() == before
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))         # as each of the 2 local workers
    try:
        for g in summary.grid:
            swept = json.loads((Path(g.run_dir) / "metrics.json").read_text())
            assert swept["data"]["cache"]["mode"] == "ram" and swept["data"]["cache"]["shared"] is True
            alone = train(train_config(store, None, out=tmp_path / f"alone-{g.lr}", lr=g.lr, cache="ram",
                                       weight_decay=g.weight_decay, seed=g.seed, **TINY))
            assert alone.data["cache"]["shared"] is False
            assert swept["val"] == alone.val and swept["test"] == alone.test
    finally:
        torch.set_num_threads(threads)


def test_runs_in_threads_share_the_splits_as_they_are_and_give_the_results_of_each_run_alone(store, tmp_path,
                                                                                              monkeypatch):
    """--runs-in threads: both runs train at once in threads of this process (dask's in-process workers) on one
    copy of the cached splits, held in this process and gone afterwards; each run's metrics and best weights
    equal its configuration trained alone (its initial weights, data order, augmentation and dropout drawn
    from generators of its own). Their test pictures are drawn by the sweep's picture processes (as on CUDA)."""
    from pathlib import Path

    import torch

    from fpt.config import train_config
    from fpt.train import train
    from fpt.train.data import PROCESS_SPLITS
    from fpt.train.plots import PicturePool

    monkeypatch.setattr("fpt.train.sweep.draws_pictures_apart", lambda cuda, runs: True)      # as on CUDA
    drawn, draw = [], PicturePool.write_evaluation_plots

    def counted(self, prefix, *args, **kwargs):
        drawn.append(prefix)
        return draw(self, prefix, *args, **kwargs)
    monkeypatch.setattr(PicturePool, "write_evaluation_plots", counted)
    cfg = sweep_config(store, lr="1e-3,3e-3", weight_decay="0", seeds=1, scheduler="local:2", cache="ram",
                       runs_in="threads", out=tmp_path / "sweep", **{**TINY, "epochs": 3})
    summary = run_sweep(cfg)
    assert summary.ran == 2 and PROCESS_SPLITS == {}
    assert sorted(drawn) == sorted(Path(g.run_dir) / "test" for g in summary.grid)
    for g in summary.grid:
        assert {p.name for p in Path(g.run_dir).glob("*.png")} == {"test-roc.png", "test-confusion.png"}
        swept = json.loads((Path(g.run_dir) / "metrics.json").read_text())
        assert swept["data"]["cache"]["shared"] is True
        alone = train(train_config(store, None, out=tmp_path / f"alone-{g.lr}", lr=g.lr, cache="ram",
                                   weight_decay=g.weight_decay, seed=g.seed, **{**TINY, "epochs": 3}))
        assert swept["val"] == alone.val and swept["test"] == alone.test
        assert [r["loss"] for r in map(json.loads, open(Path(g.run_dir) / "log.jsonl"))] == \
            [r["loss"] for r in map(json.loads, open(tmp_path / f"alone-{g.lr}" / "log.jsonl"))]
        a = torch.load(tmp_path / f"alone-{g.lr}" / "best.pt", weights_only=True)["model"]
        b = torch.load(Path(g.run_dir) / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_twelve_runs_in_threads_at_once_finish_with_the_results_of_a_run_alone(store, tmp_path, device):
    """The bench's sweep, small: 12 runs (3 lr x 2 weight decay x 2 seeds) as threads of this process at once
    (on CUDA each on a stream of its own: more than torch's pool of 32 if each drew three; each reading its test
    split from its thread: lease 5's two failures). All finish (on CUDA with their step captured), and a run's
    results are those of its configuration alone."""
    import torch

    from fpt.config import train_config
    from fpt.train import train
    from fpt.train.sweep import execute, make_run

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    options = {**TINY, "epochs": 2, "device": device, "cache": "gpu" if device == "cuda" else "ram"}
    cfg = sweep_config(store, lr="1e-3,2e-3,3e-3", weight_decay="0,0.05", seeds=2, runs_in="threads",
                       out=tmp_path / "sweep", **options)
    runs = [make_run(cfg, "grid", lr, wd, seed) for lr in cfg.lrs for wd in cfg.weight_decays for seed in (0, 1)]
    results = execute(runs, "local:12", None, runs_in="threads")
    assert len(results) == 12 and all(m.throughput.captured == (device == "cuda") for m in results.values())
    last = runs[-1]
    alone = train(train_config(store, None, out=tmp_path / "alone", lr=last.lr, weight_decay=last.weight_decay,
                               seed=last.seed, **options))
    assert results[last.name].val == pytest.approx(alone.val) and results[last.name].test == pytest.approx(alone.test)


def test_a_run_in_a_thread_stops_with_its_sweep_and_resumes_to_the_uninterrupted_results(store, tmp_path):
    """A sweep that stops (a run failed, Ctrl-C) cannot cancel its runs in threads: each stops at its next step
    (RunStopped), writing last.pt; training that run again continues from it to the results of a run never
    stopped."""
    import threading
    from dataclasses import asdict

    from fpt.config import train_config
    from fpt.train import train
    from fpt.train.results import jsonable
    from fpt.train.sweep import THREAD_SWEEPS, RunStopped, ThreadSweep, train_task

    from fpt.store import StoreReader

    steps = len(StoreReader(store).split_indices("train")) // TINY["batch_size"]

    class StopInTheSecondEpoch(threading.Event):      # asked after each step
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > steps

    options = {**TINY, "epochs": 3, "checkpoint_seconds": 0}
    cfg = train_config(store, None, out=tmp_path / "stopped", lr=1e-3, **options)
    THREAD_SWEEPS["k"] = ThreadSweep(StopInTheSecondEpoch())
    try:
        with pytest.raises(RunStopped):
            train_task(jsonable(asdict(cfg)), None, thread_key="k")
    finally:
        THREAD_SWEEPS.pop("k")
    assert (tmp_path / "stopped" / "last.pt").exists() and not (tmp_path / "stopped" / "metrics.json").exists()
    resumed = train(cfg)
    whole = train(train_config(store, None, out=tmp_path / "whole", lr=1e-3, **options))
    assert resumed.val == whole.val and resumed.test == whole.test
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl"))] for run in ("stopped", "whole")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_run_failing_in_a_thread_stops_the_others_resumably(store, tmp_path, monkeypatch):
    """Runs in threads cannot be cancelled: when one fails, the sweep raises its error once the others have
    stopped at their next step, each with its last.pt written (a re-run resumes them)."""
    import threading

    from fpt.train import loop

    real_epoch, other_trained_an_epoch = loop.train_epoch, threading.Event()

    def train_epoch(run, epoch, on_batch=None):
        if run.cfg.lr == 1e-3 and epoch == 1:
            other_trained_an_epoch.set()
        if run.cfg.lr == 3e-3 and epoch == 1:
            assert other_trained_an_epoch.wait(120)             # so that it has a last.pt to write when stopped
            raise RuntimeError("device lost")
        return real_epoch(run, epoch, on_batch)

    monkeypatch.setattr(loop, "train_epoch", train_epoch)
    cfg = sweep_config(store, lr="1e-3,3e-3", weight_decay="0", seeds=1, scheduler="local:2", runs_in="threads",
                       out=tmp_path / "sweep", **{**TINY, "epochs": 500, "checkpoint_seconds": 0})
    with pytest.raises(FptError, match="failed: RuntimeError: device lost"):
        run_sweep(cfg)
    other = tmp_path / "sweep" / "runs" / "lr0.001-wd0-seed0"
    assert (other / "last.pt").exists() and not (other / "metrics.json").exists()


def test_where_runs_compile_the_first_runs_alone_until_its_first_step_is_done(store, tmp_path, monkeypatch):
    """torch.compile keeps compiled graphs in on-disk caches: the other local runs are handed to the cluster only
    once the first has compiled and taken its first training step (it sets a dask Event; the first run is still
    training then), so that they load its compiled step rather than all compiling it at once. Compiling is
    pretended (the runs train eagerly: a CPU compile takes a minute)."""
    from distributed import Client

    from fpt.train import sweep

    monkeypatch.setattr(sweep, "step_compiles", lambda compile: True)
    events, real_submit, real_wait = [], Client.submit, sweep.wait_for_first_step

    def submit(self, fn, *args, **kwargs):
        if fn is sweep.train_task:
            events.append("submit")
        return real_submit(self, fn, *args, **kwargs)

    def wait(client, event, future):
        real_wait(client, event, future)
        events.append(("released; the first run had ended:", future.done()))

    monkeypatch.setattr(Client, "submit", submit)
    monkeypatch.setattr(sweep, "wait_for_first_step", wait)
    summary = run_sweep(sweep_config(store, lr="1e-3,3e-3,1e-2", weight_decay="0", seeds=1, scheduler="local:2",
                                     out=tmp_path / "sweep", **{**TINY, "epochs": 3}))
    assert summary.ran == 3
    assert events == ["submit", ("released; the first run had ended:", False), "submit", "submit"]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("runs_in", ["threads", "processes"])
def test_local_runs_on_a_gpu_share_one_device_copy_of_the_splits(store, tmp_path, runs_in):
    """local:2 on CUDA with --cache gpu: the sweep's process holds the splits on the GPU; runs in threads use
    them as they are (each on a CUDA stream of its own, steps captured as CUDA graphs, dropout from a CUDA
    generator of its own), runs in processes map them through CUDA IPC; (cache.shared, mode gpu) and each run
    gives the metrics of its configuration trained alone."""
    from pathlib import Path

    from fpt.config import train_config
    from fpt.train import train

    gpu = {**TINY, "device": "cuda", "compile": False, "epochs": 6}
    summary = run_sweep(sweep_config(store, lr="1e-3,3e-3", weight_decay="0", seeds=1, scheduler="local:2",
                                     cache="gpu", runs_in=runs_in, out=tmp_path / "sweep", **gpu))
    assert summary.ran == 2
    for g in summary.grid:
        swept = json.loads((Path(g.run_dir) / "metrics.json").read_text())
        assert swept["data"]["cache"]["mode"] == "gpu" and swept["data"]["cache"]["shared"] is True
        assert "shared" in swept["data"]["cache"]["reason"]
        alone = train(train_config(store, None, out=tmp_path / f"alone-{g.lr}", lr=g.lr, cache="gpu",
                                   weight_decay=g.weight_decay, seed=g.seed, **gpu))
        assert alone.data["cache"]["shared"] is False
        assert swept["val"] == alone.val and swept["test"] == alone.test


def faked_runs(monkeypatch, scores, seed_auc=lambda seed: 0.5 + 0.1 * seed, kind="cpu_peak_rss"):
    """``run_sweep`` without training: ``execute`` replaced by runs whose val score is ``scores[(lr, wd)]`` (None:
    diverged before its first validation) and whose test AUC is ``seed_auc(seed)``; the sweep's picture is not
    drawn. The fake metrics of every run, by name, fill as runs are made."""
    from fpt.train import sweep as sweep_module
    from fpt.train.results import RunMetrics, Throughput

    made = {}

    def metrics(run):
        score = scores[(run.lr, run.weight_decay)]
        val = {"auc": score, "acc": None if score is None else score / 2, "loss": 1.0}
        test = {"auc": seed_auc(run.seed), "acc": 0.4 + 0.05 * run.seed, "f1": 0.3 + 0.07 * run.seed,
                "kappa": 0.1 * run.seed, "precision": 0.6 - 0.05 * run.seed, "recall": 0.2 + 0.1 * run.seed}
        throughput = Throughput(10.0 + run.seed, 12.0 + 3 * run.seed, 100.0 + 7 * run.seed, kind, 50.0, "cpu",
                                False, False, 1)
        return RunMetrics("fpt+", 0, "highest val score", val, test, {"ratio_percent": 1.5}, {}, throughput, {},
                          {}, "store", str(run.cfg.out))

    def execute(runs, *args, **kwargs):
        made.update({r.name: metrics(r) for r in runs})
        return {r.name: made[r.name] for r in runs}

    monkeypatch.setattr(sweep_module, "execute", execute)
    monkeypatch.setattr(sweep_module, "write_sweep_plot", lambda *args, **kwargs: None)
    return made


@pytest.mark.parametrize("scores", [[None, 0.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.7, 0.6, 0.7, None, 0.7]])
def test_the_best_grid_point_is_the_first_of_equal_val_scores_and_never_a_diverged_run(tmp_path, monkeypatch,
                                                                                         scores):
    """The configuration repeated over seeds has the highest val score; of equal scores the first in grid order
    (lr, then weight decay) wins, as the protocol says, and a run that diverged before its first validation (no
    val score) is never chosen, not even before runs that all score 0. Runs are faked, so only the choice is
    tested: equal val scores are common on small val splits."""
    lrs, wds = (0.001, 0.002, 0.003), (0.0, 0.1)
    grid = [(lr, wd) for lr in lrs for wd in wds]
    faked_runs(monkeypatch, dict(zip(grid, scores)))
    cfg = sweep_config(tmp_path / "s.zarr", lr="1e-3,2e-3,3e-3", weight_decay="0,0.1", seeds=2,
                       out=tmp_path / "sweep", **TINY)
    summary = run_sweep(cfg)
    top = max(s for s in scores if s is not None)
    first_best = next(point for point, score in zip(grid, scores) if score == top)
    assert (summary.best_lr, summary.best_weight_decay) == first_best
    assert [(s.seed, s.run_dir) for s in summary.seeds] == [
        (seed, str(tmp_path / "sweep" / "runs" / f"lr{first_best[0]:g}-wd{first_best[1]:g}-seed{seed}"))
        for seed in (0, 1)]


def test_a_grid_whose_every_run_diverged_is_one_error_and_trains_no_seeds(tmp_path, monkeypatch):
    """No run of the grid validated (each diverged before its first validation): there is no best to repeat, so
    the sweep says so, with the fix, instead of training its seeds on the first grid point and ending well."""
    made = faked_runs(monkeypatch, {(1e30, 0.0): None, (1e31, 0.0): None})
    cfg = sweep_config(tmp_path / "s.zarr", lr="1e30,1e31", weight_decay="0", seeds=3, out=tmp_path / "sweep", **TINY)
    with pytest.raises(FptError, match=r"every run of the grid diverged .*lower --lr \(the grid's: 1e\+30, 1e\+31\)"):
        run_sweep(cfg)
    assert len(made) == 2 and not (tmp_path / "sweep" / "sweep.json").exists()


def test_sweep_csv_has_each_runs_own_figures_and_the_seeds_mean_and_std(tmp_path, monkeypatch):
    """sweep.csv: one row per run with that run's val score (val AUC, not a test figure), test metrics, overall
    train rate and peak memory; then the mean and the sample std over the seeds of each column. The summary's PME
    uses the seeds' mean peak memory, and is None where the runs shared one process (memory kind ``*_shared``),
    whose peak is not one run's."""
    from fpt.train.metrics import METRIC_NAMES, pme

    scores = {(0.001, 0.0): 0.6, (0.002, 0.0): 0.8}
    made = faked_runs(monkeypatch, scores)
    cfg = sweep_config(tmp_path / "s.zarr", lr="1e-3,2e-3", weight_decay="0", seeds=3, out=tmp_path / "sweep",
                       ft_memory_mb=4000.0, **TINY)
    summary = run_sweep(cfg)
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [r["stage"] for r in rows] == ["grid"] * 2 + ["seeds"] * 3 + ["mean", "std"]
    for row in rows[:-2]:
        m = made[Path(row["run_dir"]).name]
        assert float(row["val_score"]) == m.val["auc"]
        assert float(row["samples_per_s"]) == m.throughput.train_samples_per_s
        assert float(row["peak_memory_mb"]) == m.throughput.peak_memory_mb
        assert {k: float(row[f"test_{k}"]) for k in METRIC_NAMES} == m.test
    seeds = [made[f"lr0.002-wd0-seed{s}"] for s in range(3)]
    columns = {**{f"test_{k}": [m.test[k] for m in seeds] for k in METRIC_NAMES},
               "samples_per_s": [m.throughput.train_samples_per_s for m in seeds],
               "peak_memory_mb": [m.throughput.peak_memory_mb for m in seeds]}
    for row, stat in ((rows[-2], statistics.mean), (rows[-1], statistics.stdev)):
        assert (float(row["lr"]), float(row["weight_decay"])) == (0.002, 0.0)
        for column, values in columns.items():
            assert float(row[column]) == pytest.approx(stat(values)), (row["stage"], column)
    auc = statistics.mean(m.test["auc"] for m in seeds)
    assert summary.efficiency["pme"] == pytest.approx(pme(auc, statistics.mean(columns["peak_memory_mb"]), 4000.0))

    made = faked_runs(monkeypatch, scores, kind="cpu_peak_rss_shared")
    shared = run_sweep(replace(cfg, out=tmp_path / "shared"))
    assert shared.efficiency["pme"] is None and shared.efficiency["ppe"] == summary.efficiency["ppe"] is not None
