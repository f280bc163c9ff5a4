"""What starting extraction's writer processes costs, spawned (as until 2026-11-27) against forked from the fork
server (``fpt.forkserver``, since): seconds until ``--writers`` processes have each started (``start_writer``)
and taken a task, and the CPU the whole machine spent meanwhile. This module imports torch at its top, as the
benches' main modules and most users' scripts do: a spawned process runs the main module again, so each one
imports torch; the fork server does it once.

    python -m fpt.bench.writer_start --writers 16 --reps 2

Interleaved repetitions, one fresh Python process per measurement (a program has one fork server). Results:
bench/results/writer_start.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch  # noqa: F401 - the heavy main module this measures (see the docstring)

from fpt.bench.common import machine_busy_seconds, write_results


def start(how: str, writers: int, store: str) -> dict:
    """In this process: ``writers`` writer processes started ``how`` (spawn or forkserver), each holding a task
    until all have started."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    from fpt.forkserver import fork_server_context, starting
    from fpt.store import start_writer

    hold = 0.5
    before, t0 = machine_busy_seconds(), time.perf_counter()
    context = (multiprocessing.get_context("spawn") if how == "spawn"
               else fork_server_context([start_writer.__module__]))
    pool = ProcessPoolExecutor(writers, mp_context=context, initializer=start_writer, initargs=(store, True))
    with starting():
        tasks = [pool.submit(time.sleep, hold) for _ in range(writers)]     # busy: so that all of them start
    wait(tasks)
    seconds, busy = time.perf_counter() - t0 - hold, machine_busy_seconds() - before
    pool.shutdown()
    return {"how": how, "writers": writers, "all_started_s": round(seconds, 2), "machine_cpu_s": round(busy, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--one", choices=["spawn", "forkserver"], help=argparse.SUPPRESS)   # a measurement, in-process
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.one:
            print(json.dumps(start(args.one, args.writers, f"{tmp}/none.zarr")))
            return
        rows = []
        for _ in range(args.reps):
            for how in ("spawn", "forkserver"):
                done = subprocess.run([sys.executable, "-m", "fpt.bench.writer_start", "--one", how,
                                       "--writers", str(args.writers)], capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    out = write_results("writer_start", "fpt.bench.writer_start", cases=rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
