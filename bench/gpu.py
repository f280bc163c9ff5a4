"""Extraction on whatever device this runs on, in one table: the plain forward (the limit), ``FrozenLPM`` as
``fpt extract`` runs it (fused Triton importance on CUDA; also with the torch importance path, to show what the
kernel saves), the official approach (eager attention) in fp32 and bf16, ``fpt extract`` end to end,
the official-style script end to end, ``fpt extract``'s host side alone (``host_threads`` / ``host_processes``:
the LPM's cost removed, so decoding, copies and the store writers are timed, with writer threads or processes:
the rate the pipeline could feed), the peak memory of each, and how far the selection agrees with the fp32
reference. Training rows come from ``fpt.bench.train_speed`` when it is present.

    python -m fpt.bench.gpu                      # CUDA: ViT-B at 512/1024/2048; CPU: smaller defaults
    python -m fpt.bench.gpu --model vit_base_patch16_224 --res 512:32 1024:8 --e2e 512:256 1024:64

Every case runs in its own Python process (``python -m fpt.bench.gpu --case JSON``), so no two cases share a
CUDA context, allocator or compiled kernel; a case that fails (out of memory) reports its error in its row.
Model steps: warm-up, then the median of timed steps, each ended by a device synchronisation. End to end: images
decoded from PNG files, model, selection and writing, timed from the first batch to the last write (model
loading excluded on both sides); for ``fpt extract`` also the CPU it used per image, in its own process
(``cpu_main_ms``: the loop, the pinning and writer threads; by thread in ``cpu_main_threads_ms``) and in the rest
of the machine (``cpu_others_ms``: the decode workers, the writer processes, the kernel's writeback; until
2026-11-27 ``cpu_children_ms``, the processes this one started), and how many cores the machine kept busy on
average (``cores_busy``). Peak memory:
``torch.cuda.max_memory_allocated`` on CUDA, the process's RSS high-water mark above its start on CPU. Weights
are random-init (nothing can be downloaded); the LPM's input statistics (ImageNet mean/std) are the same on both
sides.
Results: bench/results/gpu-<device>-<model>.json (figures in bench/README.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fpt.bench.common import (THREADS, WORK_DIR, PeakRSS, ThreadCPU, command_line, machine_busy_seconds,
                              write_results)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOKEN_RATIO = 0.2
MODEL_CASES = ("plain", "plain_compiled", "lpm", "lpm_two_pass", "lpm_bf16", "lpm_torch_importance", "official_fp32",
               "official_bf16")
E2E_CASES = ("fpt_extract", "official_script", "host_threads", "host_processes")
DEFAULTS = {  # device kind -> model, [(res, batch)] for model steps, [(res, images)] end to end
    "cuda": ("vit_base_patch16_224", [(512, 32), (1024, 8), (2048, 2)], [(512, 256), (1024, 64)]),
    "cpu": ("vit_tiny_patch16_224", [(256, 4), (512, 2)], [(256, 16)]),
}


# -- the cases (each runs in a child process) ---------------------------------------------------------------
def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(res: int, batch: int, device):
    """The demo task's images, normalised as the LPM sees them: float32 [batch, 3, res, res] on ``device``."""

    from fpt.bench.data import synthetic_inputs
    x, _ = synthetic_inputs(batch, res)
    return x.to(device)


def _timed(step, device, warmup: int, reps: int) -> dict[str, Any]:
    """Median of ``reps`` steps after ``warmup`` ones; ``first_step_s``: the first step of this fresh process
    alone (the libraries' lazy start: cuBLAS, cuDNN, Triton kernels loaded from their cache), which a run pays
    once."""
    import torch
    start = time.perf_counter()
    for i in range(warmup):
        step()
        if i == 0:
            _sync(device)
            first = time.perf_counter() - start
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with PeakRSS() as rss:
        for _ in range(reps):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak_mb
    return {"median_s": statistics.median(times), "peak_mb": round(peak, 1),
            "first_step_s": round(first, 3) if warmup else None}


def model_case(case: str, model: str, res: int, batch: int, warmup: int, reps: int) -> dict[str, Any]:
    """images/s and peak memory of one model step; for ``lpm`` also the selection's agreement with fp32."""
    import torch

    from fpt.bench.official import OfficialExtractor
    from fpt.extract.backbone import FrozenLPM, create_backbone
    from fpt.extract.encode import forward_fitting
    from fpt.extract.run import default_layers

    device = _device()
    net, info = create_backbone(model, res, random_init=True)
    layers = default_layers(info.depth)
    x = _images(res, batch, device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    after_timing = dict                 # extra figures computed once the steps are timed
    if case in ("plain", "plain_compiled"):
        net = net.to(device)
        forward = torch.compile(net.forward_features) if case == "plain_compiled" else net.forward_features

        def step():
            with torch.no_grad(), bf16:
                forward(x)
    elif case.startswith("lpm"):
        # lpm: as fpt extract runs it (fp16 autocast and the fused Triton importance taking the attention's lse
        # on CUDA); lpm_two_pass: the kernel computing the lse itself; lpm_bf16: bf16 autocast (fpt extract's
        # CUDA default up to 0.1.0); lpm_torch_importance: the torch path
        backend = "torch" if case == "lpm_torch_importance" else "auto"
        lpm = FrozenLPM(net, layers, TOKEN_RATIO, "global", importance_backend=backend,
                        attention_lse=case != "lpm_two_pass").to(device)
        precision = "bf16" if case == "lpm_bf16" else "auto"

        def step():
            forward_fitting(lpm, x, device, precision)   # exactly what fpt extract runs per batch

        def after_timing():     # after the steps: its fp32 copy of the model must not count in their peak
            return {"selection_agreement": selection_agreement(lpm, x, device, precision)}
    elif case in ("official_fp32", "official_bf16"):
        official = OfficialExtractor(net, layers, TOKEN_RATIO, "global").to(device)
        autocast = bf16 if case == "official_bf16" else torch.autocast(device.type, enabled=False)

        def step():
            with torch.no_grad(), autocast:
                official(x)
    else:
        raise ValueError(f"unknown case {case!r}")
    timing = _timed(step, device, warmup, reps)
    return {**after_timing(), **timing, "images_per_s": round(batch / timing["median_s"], 2)}


def selection_agreement(lpm, x, device, precision) -> float:
    """Share of selected tokens (per image, layer and head, as sets) that the LPM as run here (``precision``)
    has in common with the fp32 reference: full softmax probabilities, column mean (``OfficialExtractor``)."""
    import copy

    import torch

    from fpt.bench.official import OfficialExtractor
    from fpt.extract.encode import forward_fitting

    fast = forward_fitting(lpm, x[:2], device, precision)["indices"]       # [b, L, H, k]
    reference = OfficialExtractor(copy.deepcopy(lpm.model).float(), lpm.layers, lpm.token_ratio, "global")
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        ref = reference(x[:2].float())["indices"]
    k = fast.shape[-1]
    hits = (fast.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1).sum().item()
    return round(hits / (fast.numel() or 1), 5) if k else 1.0


def png_tree(res: int, n: int) -> Path:
    """``n`` demo images as PNG files at ``res`` px in an ImageFolder tree (cached in bench/.work)."""
    from fpt.bench.data import _write_tree
    tree = WORK_DIR / f"gpu-png{res}-{n}"
    if not (tree / "done").exists():
        counts = {"train": n - 2 * max(1, n // 8), "val": max(1, n // 8), "test": max(1, n // 8)}
        _write_tree(tree, res, counts)
        (tree / "done").touch()
    return tree


def e2e_case(case: str, model: str, res: int, images: int, batch: int, workers: int, codec: str | None = None,
             direct_io: bool = True, helper_niceness: int | None = None) -> dict[str, Any]:
    """End to end from PNG files to bytes on disk, one side; ``codec``: ``fpt extract --codec`` (None: its
    default); ``direct_io``: False for ``fpt extract --no-direct-io``; ``helper_niceness``: the helper processes'
    lower priority, as ``FPT_HELPER_NICENESS`` gives it (None: ``fpt extract``'s own, 10 on CUDA, 0 on a CPU)."""
    import torch

    from fpt.config import HELPER_NICENESS_ENV
    if helper_niceness is not None:
        os.environ[HELPER_NICENESS_ENV] = str(helper_niceness)

    device = _device()
    tree = png_tree(res, images)
    out = WORK_DIR / f"gpu-out-{case}-{res}"
    shutil.rmtree(out, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        if case == "fpt_extract" or case.startswith("host_"):
            from fpt.config import extract_config
            from fpt.extract import extract
            from fpt.extract.run import load_lpm
            writers = "auto"
            if case.startswith("host_"):
                writers = case.removeprefix("host_")
                _free_lpm()
            cfg = extract_config(None, tree, out=str(out), backbone=model, random_init=True, res=res,
                                 batch_size=batch, device=device.type, mean=MEAN, std=STD, workers=workers,
                                 writers=writers, overwrite=True, direct_io=direct_io,
                                 **({"codec": codec} if codec else {}))
            load_lpm(cfg, device)           # built before the CPU clocks start, as the timing leaves it out
            cpu_before = cpu_seconds()
            with ThreadCPU() as threads:
                result = extract(cfg)
            main, machine = (b - a for a, b in zip(cpu_before, cpu_seconds()))
            row = {"images_per_s": round(result.images_per_s, 2), "seconds": round(result.seconds, 2),
                   "steady_images_per_s": result.steady_images_per_s and round(result.steady_images_per_s, 2),
                   # the start taken apart: first decoded batch, first shard copied from the device, written
                   **{f"first_{what}_s": getattr(result, f"first_{what}_seconds") and
                      round(getattr(result, f"first_{what}_seconds"), 2) for what in ("batch", "copied", "shard")},
                   "last_shard_s": result.last_shard_seconds and round(result.last_shard_seconds, 2),   # then stopping
                   "warm_up_s": result.warm_up_seconds and round(result.warm_up_seconds, 2),
                   "moments_s": {name: round(t, 3) for name, t in result.moments_seconds.items()},
                   "waited_for_decoding_s": round(result.waited_for_decoding_s, 2),
                   "waited_for_device_s": round(result.waited_for_device_s, 2),
                   "waited_for_writers_s": round(result.waited_for_writers_s, 2),
                   "cpu_main_ms": round(1e3 * main / images, 2),
                   "cpu_others_ms": round(1e3 * (machine - main) / images, 2),
                   "cpu_main_threads_ms": {name: round(1e3 * s / images, 2) for name, s in threads.seconds.items()},
                   "cores_busy": round(machine / result.seconds, 1), "cores": os.cpu_count(),
                   "main_intra_op_threads": torch.get_num_threads()}
        elif case == "official_script":
            row = official_script(tree, out, model, res, batch, workers, device)
        else:
            raise ValueError(f"unknown case {case!r}")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak_mb
    row["disk_mb"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20, 1)
    shutil.rmtree(out, ignore_errors=True)
    return {**row, "peak_mb": round(peak, 1)}


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds so far (user + system) of this process (all its threads) and of the whole machine (every
    core's busy time: the decode workers, the writer processes, which are the fork server's children rather
    than ours, and the kernel's own work, such as writing back the page cache). The machine runs the bench
    alone, so its busy time is the extraction's."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime, machine_busy_seconds()


def _free_lpm() -> None:
    """``fpt extract``'s host side alone (the ``host_*`` cases): the LPM's output for the first batch is computed
    once and handed out again for every later batch (the same shapes, dtypes and bytes to compress), so decoding,
    the copies and the store writers are all that is timed; what the pipeline could reach with an LPM that cost
    nothing."""
    from fpt.extract import run

    real, first = run.encode_batch, {}

    def encode_again(lpm, high, *args, **kwargs):
        if not first:
            first.update(real(lpm, high, *args, **kwargs))
        n = len(high)
        if n > len(next(iter(first.values()))):
            raise ValueError("the first batch must be the largest")
        return {k: v[:n] for k, v in first.items()}

    run.encode_batch = encode_again


def official_script(tree: Path, out: Path, model: str, res: int, batch: int, workers: int, device) -> dict:
    """As the official code preloads: torchvision decode + resize + normalise in DataLoader workers, eager fp32
    LPM, top-k from the full probabilities, one fp32 safetensors file per image."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    from fpt.bench.official import OfficialExtractor, lpm_preprocess, save_per_image
    from fpt.extract.backbone import create_backbone
    from fpt.extract.run import default_layers

    net, info = create_backbone(model, res, random_init=True)
    extractor = OfficialExtractor(net, default_layers(info.depth), TOKEN_RATIO, "global").to(device)
    paths = sorted(tree.rglob("*.png"))
    preprocess = lpm_preprocess(res, MEAN, STD)
    loader = DataLoader(paths, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                        collate_fn=lambda ps: (torch.stack([preprocess(Image.open(p).convert("RGB")) for p in ps]),
                                               [p.stem for p in ps]))
    start = time.perf_counter()
    for x, names in loader:
        result = extractor(x.to(device, non_blocking=True))
        save_per_image(out, names, result["keys"].cpu(), result["values"].cpu())
    seconds = time.perf_counter() - start
    return {"images_per_s": round(len(paths) / seconds, 2), "seconds": round(seconds, 2)}


# -- the driver ---------------------------------------------------------------------------------------------
def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fpt.bench.gpu", "--case", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        return {**spec, "error": f"exit {proc.returncode}: {tail}"[:300]}
    return {**spec, **json.loads(lines[-1])}


def _child(spec: dict[str, Any]) -> None:
    import torch
    warnings.filterwarnings("ignore")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    args = {k: v for k, v in spec.items() if k not in ("kind", "threads")}
    result = model_case(**args) if spec["kind"] == "model" else e2e_case(**args)
    print(json.dumps(result))


def _pairs(items: list[str]) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(":")) for item in items]


def add_ratios(rows: list[dict]) -> None:
    """Per res: FrozenLPM / plain forward, fpt extract / FrozenLPM and / official script (the issue's goals)."""
    by = {(r["case"], r["res"]): r for r in rows if "images_per_s" in r}
    for r in rows:
        res, speed = r["res"], r.get("images_per_s")
        ref = "lpm" if r["case"] == "fpt_extract" else "plain" if r["case"].startswith("lpm") else None
        if speed and ref and (ref, res) in by:
            r[f"vs_{ref}"] = round(speed / by[(ref, res)]["images_per_s"], 3)
        if speed and r["case"] == "fpt_extract" and ("official_script", res) in by:
            r["vs_official_script"] = round(speed / by[("official_script", res)]["images_per_s"], 3)
        if r.get("steady_images_per_s") and ("lpm", res) in by:          # without the start: the loop's own rate
            r["steady_vs_lpm"] = round(r["steady_images_per_s"] / by[("lpm", res)]["images_per_s"], 3)


def print_table(rows: list[dict], device: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"fpt.bench.gpu on {device}")
    for column in ("case", "res", "batch", "images/s", "peak MB", "ratios", "note"):
        table.add_column(column, justify="right" if column in ("res", "batch", "images/s", "peak MB") else "left")
    for r in rows:
        ratios = ", ".join(f"{k.replace('vs_', '')} {v:.2f}x" for k, v in r.items() if "vs_" in k)
        note = r.get("error") or (f"selection = fp32 on {r['selection_agreement']:.2%}" if "selection_agreement" in r
                                  else f"{r['disk_mb']} MB on disk" if "disk_mb" in r else "")
        if "cores_busy" in r:
            note += f"; {r['cores_busy']} of {r['cores']} cores busy"
        if "waited_for_decoding_s" in r:
            note += (f"; waited {r['waited_for_decoding_s']} s decoding, {r.get('waited_for_device_s')} s device, "
                     f"{r['waited_for_writers_s']} s writers")
        if r.get("steady_images_per_s"):
            note += f"; steady {r['steady_images_per_s']} img/s"
        if r.get("first_shard_s"):
            note += (f"; start: first batch {r.get('first_batch_s')} s, shard copied {r.get('first_copied_s')} s, "
                     f"written {r['first_shard_s']} s; last shard written {r.get('last_shard_s')} s of {r['seconds']}")
        if r.get("first_step_s"):
            note += f"; first step {r['first_step_s']} s"
        if r.get("warm_up_s"):
            note += f"; warm-up step {r['warm_up_s']} s"
        if r.get("moments_s"):
            note += "; " + ", ".join(f"{name.replace('_', ' ')} {t} s" for name, t in r["moments_s"].items())
        case = (r["case"] + (f" --codec {r['codec']}" if r.get("codec") else "")
                + (" --no-direct-io" if r.get("direct_io") is False else "")
                + (f" (helpers at nice {r['helper_niceness']})" if r.get("helper_niceness") is not None else ""))
        table.add_row(case, str(r["res"]), str(r.get("batch", "")), str(r.get("images_per_s", "-")),
                      str(r.get("peak_mb", "-")), ratios, note)
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--model")
    p.add_argument("--res", nargs="+", help="RES:BATCH for the model steps")
    p.add_argument("--e2e", nargs="+", help="RES:IMAGES end to end (0 to skip)")
    p.add_argument("--cases", nargs="+", default=[*MODEL_CASES, *E2E_CASES])
    p.add_argument("--workers", type=int, help="decode workers end to end [default: fpt extract's, one per core up "
                                               "to 16 on CUDA, 0 on CPU]")
    p.add_argument("--reps", type=int)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per child process [default: torch's own on CUDA, 1 on CPU (see bench/README.md: "
                        "with 2 threads on a shared 2-core box every parallel region waits for a descheduled partner)]")
    p.add_argument("--codecs", nargs="+", default=[None],
                   help="fpt extract --codec of the fpt_extract and host_* cases, each a row [default: its default]")
    p.add_argument("--direct-io", nargs="+", choices=["on", "off"], default=["on"],
                   help="fpt extract --direct-io (on) or --no-direct-io (off) in the fpt_extract and host_* cases, "
                        "each a row [default: on, its default]")
    p.add_argument("--helper-niceness", nargs="+", default=["auto"],
                   help="the fpt_extract and host_* cases' helper processes (decode workers, writer processes) at "
                        "this lower CPU priority (FPT_HELPER_NICENESS), each a row [default: auto, fpt extract's own: "
                        "10 on CUDA, 0 on a CPU]")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--no-train", action="store_true", help="skip the training table (fpt.bench.train_speed)")
    args = p.parse_args(argv)
    if args.case:
        return _child(json.loads(args.case))
    import torch

    from fpt.extract.run import default_workers
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.cuda.get_device_name(0) if kind == "cuda" else f"CPU ({os.cpu_count()} cores)"
    model, steps, e2e = DEFAULTS[kind]
    model = args.model or model
    steps = _pairs(args.res) if args.res else steps
    e2e = [(r, n) for r, n in _pairs(args.e2e) if n] if args.e2e else e2e
    reps = args.reps or (10 if kind == "cuda" else 2)
    threads = args.threads or (None if kind == "cuda" else THREADS)
    workers = args.workers if args.workers is not None else default_workers(torch.device(kind))
    rows = []
    for res, batch in steps:
        for case in (c for c in MODEL_CASES if c in args.cases):
            if case in ("plain_compiled", "official_bf16", "lpm_torch_importance", "lpm_bf16") and kind != "cuda":
                continue                 # no bf16 autocast on CPU; compiling ViTs on 2 cores takes minutes
            rows.append(run_child({"kind": "model", "case": case, "model": model, "res": res, "batch": batch,
                                   "warmup": 2 if kind == "cuda" else 1, "reps": reps, "threads": threads},
                                  args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    batch_at = dict(steps)
    for res, images in e2e:
        for case in (c for c in E2E_CASES if c in args.cases):
            ours = case != "official_script"
            for codec, direct, nice in itertools.product(args.codecs if ours else [None],
                                                         args.direct_io if ours else ["on"],
                                                         args.helper_niceness if ours else ["auto"]):
                rows.append(run_child({"kind": "e2e", "case": case, "model": model, "res": res, "images": images,
                                       "batch": batch_at.get(res, 8), "workers": workers, "threads": threads,
                                       **({"codec": codec} if codec else {}),
                                       **({"direct_io": False} if direct == "off" else {}),
                                       **({"helper_niceness": int(nice)} if nice != "auto" else {})}, args.timeout))
                print(json.dumps(rows[-1]), flush=True)
    add_ratios(rows)
    training = [] if args.no_train else train_rows(kind)
    out = write_results(f"gpu-{kind}-{model}", "fpt.bench.gpu", device=device, model=model, rows=rows,
                        training=training, command=command_line("fpt.bench.gpu"))
    print_table(rows, device)
    for row in training:
        print(json.dumps(row))
    print(f"wrote {out}")


def train_rows(kind: str) -> list[dict]:
    """The training table of ``fpt.bench.train_speed`` (its ``run(device, small)``), when that module exists."""
    try:
        from fpt.bench import train_speed
    except ImportError:
        return []
    return train_speed.run(kind, small=kind != "cuda")


if __name__ == "__main__":
    main()
