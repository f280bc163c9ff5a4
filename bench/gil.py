"""Where a program holds the interpreter lock: a command run under py-spy sampling only the thread that holds
the GIL (``py-spy record --gil --nonblocking``), its samples summed by what fpt was doing.

    python -m fpt.bench.gil --name sweep -- python -m fpt.bench.train_speed --device cuda --parts sweep

Why: a sweep's runs in threads share one interpreter, so on a GPU the sum of their lock-holding Python bounds
how much they overlap. The rows say how many seconds the runs' threads (stacks through ``train_task``) held the
lock, by part of a run (``RUN_PARTS``), and how many everything else did. Without py-spy on PATH, or where it
cannot sample (no ptrace permission: checked on a short probe first), the command runs as it is and the result
says so. The command's exit status is this module's. Results: bench/results/gil-<name>.json, the raw stacks
beside it (gil-<name>.txt, py-spy's ``--format raw``).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from fpt.bench.common import RESULTS_DIR, write_results

# (what a frame's text contains, the part of a run it names), in order: a stack counts for the first part any of
# its frames names (the pictures' and metrics' calls sit inside the test; evaluation forwards run the step's code)
RUN_PARTS = (("write_evaluation_plots", "pictures"),
             ("classification_metrics", "metrics"),
             ("predict_split (fpt/train/loop.py", "evaluation forwards"),
             ("epoch_done (fpt/train/loop.py", "checkpoint copies"),
             ("set_up (fpt/train/loop.py", "set-up"),
             ("(fpt/train/step.py", "training step"),
             ("batches (fpt/train/data.py", "batch gathering"))
RUN_THREAD = "train_task (fpt/train/sweep.py"      # a frame of every run that is a dask task


def lock_seconds(raw: str, rate: int) -> dict[str, float]:
    """Seconds with the lock per part of a run (``RUN_PARTS``; ``run, other`` for the rest of a run's thread),
    and ``outside runs`` for every other thread, from py-spy's raw output (``frame;frame;... count`` a line,
    outermost frame first) sampled at ``rate`` per second."""
    samples: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not any(RUN_THREAD in f for f in frames):
            samples["outside runs"] += int(count)
            continue
        part = next((name for key, name in RUN_PARTS if any(key in frame for frame in frames)), "run, other")
        samples[part] += int(count)
    return {part: round(n / rate, 3) for part, n in samples.most_common()}


def record(py_spy: str, command: list[str], raw: Path, rate: int, quiet: bool = False) -> int:
    """``command`` run as a child of this process with py-spy attached to it, sampling the thread that holds the
    lock into ``raw``; the command's exit status (py-spy's own is 0 whatever the command's, so it does not run
    the command; the command's first ~0.1 s, before py-spy attaches, is not sampled)."""
    out = subprocess.DEVNULL if quiet else None
    child = subprocess.Popen(command)
    time.sleep(0.1)                                     # the child's interpreter loaded, for py-spy to find
    spy = subprocess.Popen([py_spy, "record", "--gil", "--nonblocking", "--rate", str(rate), "--format", "raw",
                            "-o", str(raw), "--pid", str(child.pid)], stdout=out, stderr=out)
    rc = child.wait()
    spy.wait()
    return rc


def can_sample(py_spy: str) -> bool:
    """Whether py-spy can sample a child of this process here (it needs ptrace permission)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.txt"
        record(py_spy, [sys.executable, "-c", "import time\nfor _ in range(10**7): pass\ntime.sleep(0.5)"], probe,
               100, quiet=True)
        return probe.exists() and probe.stat().st_size > 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the result's name: bench/results/gil-<name>.json")
    p.add_argument("--rate", type=int, default=200, help="samples per second")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")
    py_spy = shutil.which("py-spy")
    sampled = py_spy is not None and can_sample(py_spy)
    RESULTS_DIR.mkdir(exist_ok=True)
    raw = RESULTS_DIR / f"gil-{args.name}.txt"
    if sampled:
        rc = record(py_spy, command, raw, args.rate)
    else:
        rc = subprocess.run(command).returncode
    seconds = lock_seconds(raw.read_text(), args.rate) if sampled and raw.exists() else None
    out = write_results(f"gil-{args.name}", "fpt.bench.gil", measured_command=command, rc=rc, rate=args.rate,
                        sampled=sampled, why_not=None if sampled else
                        ("py-spy not on PATH" if py_spy is None else "py-spy cannot sample here (ptrace)"),
                        lock_seconds=seconds)
    for part, s in (seconds or {}).items():
        print(f"{part:20s} {s:8.2f} s with the interpreter lock")
    print(f"wrote {out}" + ("" if sampled else " (not sampled)"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
