"""Shared machinery of the benchmarks: each case in fresh subprocesses, peak RSS from the kernel's high-water
mark, timing with warm-up and median (wall-clock and CPU time), result files.

A *case* is a function ``case(**spec) -> Case`` that builds everything it needs (model, data) and returns the
``step`` to time. ``run_case("fpt.bench.extraction:extraction_case", spec)`` runs it twice, each time in a new
Python process (``run_isolated``):

* timing run: ``warmup`` + ``reps`` steps, each timed in wall-clock and in process CPU time (all threads; on a
  machine shared with other work the CPU time is the steadier of the two); the median of the reps counts;
* memory run: one step with glibc's mmap threshold fixed at 1 MB (``MEMORY_RUN_ENV``), so that RSS follows the
  live tensors instead of what the allocator retains.

In each process: ``torch.set_num_threads``, build the case, baseline = RSS, reset the RSS high-water mark
(``/proc/self/clear_refs`` = 5), run the steps, peak = VmHWM - baseline (where the mark cannot be reset, RSS is
sampled every 1 ms by a thread instead). So a memory figure is what the measured work adds on top of the
loaded model and inputs, and the two sides of a comparison never share a process.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = Path(os.environ.get("FPT_BENCH_RESULTS", BENCH_DIR / "results"))  # bench/lease.sh: its $OUT
WORK_DIR = BENCH_DIR / ".work"           # generated data sets, stores, safetensors dirs (git-ignored)
MACHINE = "dev box, 2 CPU cores, 24 GB, no GPU, shared with other work"
# One intra-op thread by default: on this 2-core box shared with other work (load average 4-8 while these
# figures were taken), 2 OpenMP threads made every parallel region wait for a descheduled partner — ViT-Tiny at
# 256 took 2.1 s per batch with 2 threads against 0.11 s with 1 (same process, same minute). --threads 2 on a
# quiet machine.
THREADS = 1


@dataclass
class Case:
    step: Callable[[], Any]     # the work to time, called warmup + reps times
    units: int                  # images / samples processed by one step
    info: dict = field(default_factory=dict)
    after: Callable[[], dict] | None = None     # called once after the timed steps (untimed); joins the result


# -- memory ------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine has been busy so far (user, nice, system, interrupts): on a machine
    running one bench alone, the CPU of everything it started, its children's children and the kernel's
    writeback included."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


class ThreadCPU:
    """CPU seconds of this process's threads inside the ``with`` block, by what they are: each thread's clock
    (``/proc/self/task/<tid>/stat``) read every ``interval`` seconds and named by its Python thread's name with
    the numbers left out (``fpt-shard-writer``, ``(_pin_memory_loop)``; ``native`` for threads Python did not
    start: CUDA's, OpenMP's). A thread that ends loses the CPU it used since its last reading (at most
    ``interval``), so the named parts add up to a little less than the process's own figure.

    >>> with ThreadCPU() as threads: work()
    >>> threads.seconds      # {"MainThread": 3.1, "fpt-shard-writer": 0.4, "native": 0.9, ...}
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self._last, self._names = interval, {}, {}
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "ThreadCPU":
        self._start = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="fpt-bench-thread-cpu")
        self._thread.start()
        return self

    def _read(self) -> dict[int, float]:
        times = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:                     # ended meanwhile
                continue
            times[int(tid)] = (int(fields[11]) + int(fields[12])) / self._tick      # utime + stime
        return times

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._note()

    def _note(self) -> None:
        self._names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
        self._last.update(self._read())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._note()
        seconds: dict[str, float] = {}
        for tid, t in self._last.items():
            if tid == self._thread.native_id:
                continue
            name = " ".join(w for w in self._names.get(tid, "native").replace("_", " _").split()
                            if not w.strip("_-").isdigit() and not w.startswith("Thread-")).replace(" _", "_")
            seconds[name] = seconds.get(name, 0.0) + t - self._start.get(tid, 0.0)
        self.seconds = {k: round(v, 2) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}


class PeakRSS:
    """Peak resident set size reached inside the ``with`` block, minus the RSS at its start.

    >>> with PeakRSS() as mem: work()
    >>> mem.peak_mb, mem.method
    """

    def __enter__(self) -> "PeakRSS":
        self.baseline = rss_bytes()
        self.method = "VmHWM reset via /proc/self/clear_refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if _status_kib("VmHWM") is None:
                raise OSError
        except OSError:
            self.method = "psutil RSS sampled every 1 ms"
            self._max, self._stop = self.baseline, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.method.startswith("VmHWM"):
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


# -- running one case ------------------------------------------------------------------------------------------
def measure(case: Case, warmup: int, reps: int) -> dict[str, Any]:
    """Time ``warmup + reps`` steps under PeakRSS; the median of the ``reps`` timed steps is the figure."""
    import gc
    gc.collect()
    times: list[float] = []
    cpu: list[float] = []
    with PeakRSS() as mem:
        for _ in range(warmup + reps):
            start, start_cpu = time.perf_counter(), time.process_time()
            case.step()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    median = statistics.median(times[warmup:] or times)
    median_cpu = statistics.median(cpu[warmup:] or cpu)
    extra = case.after() if case.after else {}
    return {**extra, "units_per_step": case.units, "step_seconds": [round(t, 4) for t in times], "warmup": warmup,
            "median_s": round(median, 4), "units_per_s": round(case.units / median, 3),
            "step_cpu_seconds": [round(t, 4) for t in cpu], "median_cpu_s": round(median_cpu, 4),
            "units_per_cpu_s": round(case.units / median_cpu, 3),
            "peak_mb": round(mem.peak_mb, 1), "baseline_mb": round(mem.baseline / 2**20, 1),
            "memory_method": mem.method, **case.info}


# glibc keeps freed blocks below its (dynamic, up to 32 MB) mmap threshold in the heap, so the RSS high-water
# mark also counts allocator retention. The memory run fixes the threshold at 1 MB: big tensors are mapped and
# unmapped, and RSS follows the live tensors.
MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_case(target: str, spec: dict[str, Any], warmup: int = 1, reps: int = 3, timeout: float = 1800,
             timing_run: bool = True) -> dict[str, Any]:
    """Two fresh processes per case: a timing run (default allocator; ``warmup`` + ``reps`` steps) and a memory
    run (one step under ``MEMORY_RUN_ENV``). ``peak_mb`` is the memory run's; the timing run's peak is kept as
    ``peak_mb_default_malloc``. Without ``timing_run`` only the memory run is made and its single step's time
    is reported (``timing: "memory run only"``), for cases too slow to repeat."""
    memory = run_isolated(target, spec, 0, 1, timeout, env=MEMORY_RUN_ENV)
    if not timing_run:
        return {**memory, "timing": "memory run only (1 step, no warm-up, MALLOC_MMAP_THRESHOLD_ set)"}
    timing = run_isolated(target, spec, warmup, reps, timeout)
    if "error" in timing:
        return timing
    return {**timing, "peak_mb_default_malloc": timing["peak_mb"], "peak_mb": memory.get("peak_mb"),
            "memory_method": f"{memory.get('memory_method')}, one step, {MEMORY_RUN_ENV}",
            **({"memory_error": memory["error"]} if "error" in memory else {})}


def run_isolated(target: str, spec: dict[str, Any], warmup: int = 1, reps: int = 3,
                 timeout: float = 1800, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``module:function(**spec)`` as a case in a fresh Python process and return ``measure``'s dict
    (or ``{"error": ...}`` when the process fails, e.g. killed for memory)."""
    payload = json.dumps({"target": target, "spec": spec, "warmup": warmup, "reps": reps})
    cmd = [sys.executable, "-m", "fpt.bench.common", payload]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", **spec}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}", **spec}
    return json.loads(lines[-1])


def _child(payload: str) -> None:
    import torch
    request = json.loads(payload)
    torch.set_num_threads(request["spec"].get("threads", THREADS))
    request["spec"].pop("threads", None)
    module, name = request["target"].split(":")
    case = getattr(importlib.import_module(module), name)(**request["spec"])
    result = measure(case, request["warmup"], request["reps"])
    print(json.dumps({**request["spec"], **result, "threads": torch.get_num_threads()}))


# -- results ----------------------------------------------------------------------------------------------------
def code_version() -> str:
    """Which fpt code was measured: $FPT_BENCH_CODE when set (e.g. a clean snapshot of a commit), else the git
    commit of the tree ``fpt`` is imported from, flagged when it has uncommitted changes outside bench/."""
    if os.environ.get("FPT_BENCH_CODE"):
        return os.environ["FPT_BENCH_CODE"]
    import fpt
    root = Path(fpt.__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [l for l in git("status", "--porcelain", "--untracked-files=no").splitlines() if "bench/" not in l]
    return sha + (" + uncommitted changes" if dirty else "")


def environment() -> dict[str, Any]:
    import timm
    import torch
    machine = (f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores" if torch.cuda.is_available()
               else MACHINE)
    return {"machine": machine, "date": date.today().isoformat(), "code": code_version(),
            "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "threads": THREADS,
            "cpu": platform.processor() or platform.machine(), "load_avg_at_start": os.getloadavg()}


def command_line(module: str) -> str:
    """How this figure was produced: ``python -m <module> <args>``."""
    return " ".join(["python -m", module, *(shlex.quote(a) for a in sys.argv[1:])])


def write_results(name: str, module: str, **content: Any) -> Path:
    """bench/results/<name>.json: the environment, the exact command and ``content``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    payload = {"figure": name, "command": command_line(module), **environment(), **content}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def merge_cases(name: str, new: list[dict], key: Sequence[str]) -> list[dict]:
    """The cases already in bench/results/<name>.json, with those measured again (same ``key`` fields) replaced
    by ``new``; lets one figure be filled by several short runs (each pair of sides still shares one run)."""
    path = RESULTS_DIR / f"{name}.json"
    old = json.loads(path.read_text()).get("cases", []) if path.exists() else []
    fresh = {tuple(c.get(k) for k in key) for c in new}
    return [c for c in old if tuple(c.get(k) for k in key) not in fresh] + new


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing."""
    return round(a / b, 3) if a and b else None


if __name__ == "__main__":
    _child(sys.argv[1])
