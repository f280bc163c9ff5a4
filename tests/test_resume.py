"""Crash safety and scale-out of extraction: SIGKILL + resume, the store lock, dask.distributed workers."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from fpt import FptError
from fpt.config import extract_config
from fpt.extract import extract
from fpt.extract.encode import forward_fitting
from fpt.store import StoreLock, StoreReader
from tests.conftest import write_image_folder
from tests.helpers import (DASK_CASE, SLOW_RES, TINY, assert_same_store, cli, dask_case_single_process,
                           interrupt_after_first_shard, slow_extraction)


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_store(tmp_path):
    options, data = slow_extraction(tmp_path)
    store = tmp_path / "killed.zarr"
    interrupt_after_first_shard(cli(*options, "--out", store), store, signal.SIGKILL)
    partial = StoreReader(store).done()
    assert 0 < partial.sum() < 24
    assert (store.parent / "killed.zarr.lock").exists()          # left behind by the dead process

    resumed = subprocess.run(cli(*options, "--out", store), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert f"wrote {24 - partial.sum()} samples" in " ".join(resumed.stdout.split())
    clean = tmp_path / "clean.zarr"
    extract(extract_config(None, data, out=clean, res=SLOW_RES, samples_per_shard=4, batch_size=1, **TINY))
    assert_same_store(store, clean)


def test_second_extraction_is_refused_while_one_runs(tmp_path):
    store = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from fpt.store import StoreLock\n"
                               f"with StoreLock({str(store)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        data = write_image_folder(tmp_path / "d", {"train": 1, "val": 1, "test": 1})
        with pytest.raises(FptError, match=f"being extracted by pid {holder.pid}"):
            extract(extract_config(None, data, out=store, res=64, **TINY))
    finally:
        holder.kill()
        holder.wait()
    with StoreLock(store):          # the kernel released the dead holder's lock: taken over
        pass
    assert not (tmp_path / "s.zarr.lock").exists()


def test_a_lock_taken_over_from_a_dead_holder_names_only_the_new_holder(tmp_path):
    """A dead holder's record stays in the lock file (the kernel releases only its flock). The new holder replaces
    it whole, also when the dead record was longer (a longer host name): a rival is then told who holds the store
    now, not "pid ?" from a record with the dead one's tail left after it."""
    store, lock_file = tmp_path / "s.zarr", tmp_path / "s.zarr.lock"
    lock_file.write_text(json.dumps({"pid": 99999999, "host": "a-far-longer-host-name.cluster.example.org",
                                     "since": "2026-01-01T00:00:00"}))
    with StoreLock(store):
        holder = json.loads(lock_file.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FptError, match=f"being extracted by pid {os.getpid()} on {socket.gethostname()} "):
            with StoreLock(store):
                pass


def test_a_lock_file_removed_between_its_open_and_its_lock_is_opened_again(tmp_path, monkeypatch):
    """A releasing holder removes the lock file and then drops its flock: a taker that opened the file before the
    removal and locks it after would hold a file no one else opens (a third process would create and lock a new
    one). The taker opens the file anew instead, so the lock file beside the store names it and a rival is
    refused."""
    import fcntl

    from fpt.store import lock as lock_module

    store, lock_file = tmp_path / "s.zarr", tmp_path / "s.zarr.lock"
    real_flock, removed = fcntl.flock, []

    def released_meanwhile(fd, operation):
        if operation & fcntl.LOCK_EX and not removed:
            lock_file.unlink()              # the previous holder's release, between this taker's open and lock
            removed.append(fd)
        return real_flock(fd, operation)

    monkeypatch.setattr(lock_module.fcntl, "flock", released_meanwhile)
    with StoreLock(store):
        assert removed and json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(FptError, match=f"being extracted by pid {os.getpid()} "):
            with StoreLock(store):
                pass
    assert not lock_file.exists()


def test_dask_local_cluster_writes_the_same_store(tmp_path):
    data, _ = dask_case_single_process(tmp_path)
    cfg = DASK_CASE
    seen = []
    result = extract(extract_config(None, data, out=tmp_path / "dask.zarr", **cfg), scheduler="local:2",
                     progress=lambda done, total: seen.append((done, total)))
    assert result.n_written == 20 and seen[-1] == (20, 20)
    assert_same_store(tmp_path / "dask.zarr", tmp_path / "single.zarr")
    assert StoreReader(tmp_path / "dask.zarr").attrs["last_run"]["scheduler"] == "local:2"


def test_bad_scheduler_is_clear(tmp_path):
    data = write_image_folder(tmp_path / "d", {"train": 1, "val": 1, "test": 1})
    with pytest.raises(FptError, match="expected local"):
        extract(extract_config(None, data, out=tmp_path / "s.zarr", res=64, **TINY), scheduler="local:x")


def test_out_of_memory_batches_are_split_until_they_fit():
    calls = []

    class TinyGPU(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            if len(x) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return {"keys": x * 2, "cls": x.sum((1, 2, 3))}

    x = torch.arange(5.0).view(5, 1, 1, 1)
    out = forward_fitting(TinyGPU(), x, torch.device("cpu"))
    torch.testing.assert_close(out["keys"], x * 2)
    assert calls == [5, 2, 3, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_extraction_matches_cpu(tmp_path):
    data = write_image_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    cpu = extract(extract_config(None, data, out=tmp_path / "cpu.zarr", res=64, **TINY))
    gpu = extract(extract_config(None, data, out=tmp_path / "gpu.zarr", res=64, **{**TINY, "device": "cuda"}))
    assert cpu.n_written == gpu.n_written == 8
    a, b = StoreReader(tmp_path / "cpu.zarr"), StoreReader(tmp_path / "gpu.zarr")
    ka, kb = a.read(range(8), ("keys",))["keys"], b.read(range(8), ("keys",))["keys"]
    assert np.abs(ka.astype(np.float32) - kb.astype(np.float32)).mean() < 0.05     # bf16 autocast
    assert b.attrs["last_run"]["peak_memory_kind"] == "cuda max_memory_allocated"
