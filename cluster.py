"""dask.distributed for extraction shards and sweep runs alike: connect to ``local``/``local:N`` (a LocalCluster
started here) or a
scheduler address, and pick a worker's GPU."""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from fpt import FptError

if TYPE_CHECKING:
    import distributed


def local_worker_count(scheduler: str, cuda: bool, per_gpu: int = 1) -> int | None:
    """N for ``local:N``; for ``local``: ``per_gpu`` workers per GPU on CUDA (they share it: worker i takes GPU
    i % count), else one per two CPU cores (each run trains with the remaining threads). None for a scheduler
    address."""
    if scheduler == "local":
        return max(1, torch.cuda.device_count()) * per_gpu if cuda else max(1, (os.cpu_count() or 1) // 2)
    if scheduler.startswith("local:"):
        count = scheduler.split(":", 1)[1]
        n = int(count) if re.fullmatch(r"[0-9]+", count) else 0          # ASCII digits only (int() takes "1_000")
        if n < 1:
            raise FptError(f"--scheduler {scheduler!r}: expected local, local:N (N >= 1) or a scheduler address")
        return n
    check_scheduler_address(scheduler)
    return None


def check_scheduler(scheduler: str) -> bool:
    """Refuse a malformed ``--scheduler`` before any work; whether it is a local one (``local``, ``local:N``)."""
    return local_worker_count(scheduler, cuda=False) is not None


def check_scheduler_address(address: str) -> None:
    """Refuse a scheduler address dask cannot parse (``host:port`` or ``tcp://host:port``) before any work."""
    from distributed.comm import parse_address, parse_host_port

    try:
        protocol, location = parse_address(address)
        if protocol in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError as e:
        raise FptError(f"--scheduler {address}: not a dask scheduler address ({e}); expected local, local:N or "
                       "HOST:PORT (tcp://HOST:PORT)") from None


@contextmanager
def dask_client(scheduler: str, cuda: bool, per_gpu: int = 1, processes: bool = True, tasks: int | None = None
                ) -> Iterator[tuple["distributed.Client", int | None]]:
    """(client, torch threads per task): a LocalCluster of worker processes (one thread each, resource GPU=1
    per worker on CUDA, dashboard on a free port) that is closed afterwards, or a client of a running scheduler
    (threads None: remote workers use their own cores; CUDA tasks ask for GPU=1, so start those workers with
    ``--resources GPU=1``). ``processes=False``: the local workers are threads of this process (threads None:
    torch's thread count is the process's, not a task's). ``tasks``: how many tasks there are to run; a local
    cluster starts no more workers than that."""
    from distributed import Client, LocalCluster

    n = local_worker_count(scheduler, cuda, per_gpu)
    if n is not None and tasks is not None:
        n = max(1, min(n, tasks))       # `local:40` for 3 runs: 37 idle processes, each importing torch, were started
    cluster = None
    if n is not None:
        # silence_logs CRITICAL: a task that fails (bad input in a run, or a run in a thread stopped by Ctrl-C) is
        # reported by the command in one line; dask's own "Compute Failed" report of it would add its traceback
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=":0",
                               resources={"GPU": 1} if cuda else None, silence_logs=logging.CRITICAL)
        client, threads = Client(cluster), max(1, (os.cpu_count() or 1) // n) if processes else None
    else:
        try:
            client, threads = Client(scheduler, timeout=30), None
        except (OSError, TimeoutError, ValueError) as e:
            raise FptError(f"--scheduler {scheduler}: cannot reach the dask scheduler ({e})") from None
    try:
        yield client, threads
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_device(device: str) -> str:
    """The device for a task in this process: on a multi-GPU machine a LocalCluster worker (named 0..N-1)
    takes GPU ``name % count``; anything else keeps ``device``."""
    if device not in ("auto", "cuda") or torch.cuda.device_count() < 2:     # one GPU: every worker shares it
        return device
    try:
        from distributed import get_worker
        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else device


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon runs on this machine. Only under MPS do the kernels of several
    processes (a sweep's concurrent runs on one GPU) execute at the same time; without it the GPU switches
    between the processes' contexts, so concurrent runs fill only the gaps each one leaves."""
    import psutil

    return any(p.info["name"] == "nvidia-cuda-mps-control" for p in psutil.process_iter(["name"]))


def gpu_sharing_note(runs_per_gpu: int, mps: bool, threads: bool = False) -> str:
    """What a user should know about ``runs_per_gpu`` runs sharing each GPU: as threads of this process, or as
    processes."""
    if runs_per_gpu < 2:
        return "one run per GPU"
    if threads:
        return (f"{runs_per_gpu} runs per GPU as threads of this process, each on a CUDA stream of its own: their "
                "kernels overlap")
    return (f"{runs_per_gpu} runs per GPU as processes; CUDA MPS " + (
        "is running: their kernels overlap" if mps else
        "is not running: the GPU time-slices between them (start `nvidia-cuda-mps-control -d` so that their "
        "kernels overlap)"))

