"""The fast data path: in-memory vs streamed splits give the same samples, whole-shard reads, the cache
decision, and the batched augmentation against torchvision's per-image operations."""
import json

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from fpt import FptError
from fpt.config import AugmentConfig, train_config
from fpt.store import SharedArrays, StoreReader
from fpt.train import train
from fpt.train.data import (AugmentParams, MemorySplit, SideInput, StreamSplit, colour_jitter, crop_grid, jitter_order,
                             open_split, plan_cache)
from tests.conftest import micro_config, write_image_folder

CPU = torch.device("cpu")
NAMES = ("images", "keys", "values")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from fpt.extract import extract

    root = tmp_path_factory.mktemp("data")
    out = root / "micro.zarr"
    # 3 samples per shard: shards mix splits and the train split ends in a partial shard
    extract(micro_config(write_image_folder(root / "data", {"train": 5, "val": 2, "test": 2}), out,
                         samples_per_shard=3))
    return out


def collect(batches):
    rows = [{n: t.numpy() for n, t in b.items()} for b in batches]
    return {n: np.concatenate([r[n] for r in rows]) for n in rows[0]}, [len(r["labels"]) for r in rows]


def test_memory_and_stream_give_the_split_in_store_order(store):
    reader = StoreReader(store)
    expected = reader.read(reader.split_indices("train"), NAMES)
    for data in (MemorySplit(reader, "train", NAMES, CPU), StreamSplit(reader, "train", NAMES, CPU, window_samples=4)):
        got, sizes = collect(data.batches(4))
        assert sizes == [4, 4, 2]
        np.testing.assert_array_equal(got["keys"], expected["keys"])
        np.testing.assert_array_equal(got["images"], expected["images"].transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(got["labels"], expected["labels"])


def test_memory_batches_are_the_order_cut_into_batches_whatever_the_batch_size(store):
    """A split in memory (host or device) gives its rows cut into batches of the batch size, the last one partial
    unless drop_last (full batches only): for batch sizes that divide the split, that do not, and above it."""
    from itertools import product

    reader = StoreReader(store)
    labels = reader.labels[reader.split_indices("train")]
    n = len(labels)
    splits = (MemorySplit(reader, "train", NAMES, CPU), MemorySplit(reader, "train", NAMES, CPU, on_device=True))
    for batch_size, drop_last in product((1, 2, 3, 5, n, n + 1), (False, True)):
        want = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        want = [s for s in want if s == batch_size] if drop_last else want
        for split in splits:
            got = list(split.batches(batch_size, drop_last=drop_last))
            assert [len(b["labels"]) for b in got] == want, (batch_size, drop_last, split.tensors is not None)
            np.testing.assert_array_equal(torch.cat([b["labels"] for b in got] or [torch.zeros(0)]).numpy(),
                                          labels[:sum(want)])


def test_reused_batches_are_gathered_into_the_same_tensors_with_the_same_samples(store):
    """``batches(reuse=True)`` of a split on the device (here the CPU stands in): every full batch is written
    into the same tensors, with the samples of fresh batches; the partial last batch is one of its own."""
    reader = StoreReader(store)
    split = MemorySplit(reader, "train", NAMES, CPU, on_device=True)
    fresh = [{n: t.clone() for n, t in b.items()} for b in split.batches(4, True, np.random.default_rng(3))]
    reused, where = [], []
    for b in split.batches(4, True, np.random.default_rng(3), reuse=True):
        reused.append({n: t.clone() for n, t in b.items()})
        where.append(b["keys"].data_ptr())
    assert [len(b["labels"]) for b in reused] == [4, 4, 2] and where[0] == where[1] != where[2]
    for a, b in zip(fresh, reused):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_epochs_shuffle_every_sample_exactly_once(store, workers):
    reader = StoreReader(store)
    data = StreamSplit(reader, "train", NAMES, CPU, workers=workers, window_samples=4)
    orders = []
    for seed in (0, 0, 1):
        got, sizes = collect(data.batches(3, shuffle=True, rng=np.random.default_rng(seed)))
        assert sum(sizes) == 10 and all(s == 3 for s in sizes[:-1])
        # identify samples by their keys: each train sample exactly once
        flat = got["keys"].reshape(10, -1)
        want = reader.read(reader.split_indices("train"), ("keys",))["keys"].reshape(10, -1)
        order = [int(np.flatnonzero((want == row).all(1))[0]) for row in flat]
        assert sorted(order) == list(range(10))
        orders.append(order)
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_store_reader_workers_start_at_the_helpers_priority_with_their_memory_reused(store, tmp_path, monkeypatch):
    """Each reader worker of a streamed split runs ``reuse_freed_memory`` as it starts (the DataLoader's
    ``worker_init_fn``; forked, so the spy is theirs too), at the CPU priority ``helper_niceness`` gives (made to
    give 2 here, as it does on CUDA), and reads the same samples."""
    import os

    from fpt.store import shared
    from fpt.train import data

    own = os.nice(0)
    started = tmp_path / "started"
    monkeypatch.setattr(shared, "reuse_freed_memory",
                        lambda: started.open("a").write(f"{os.getpid()} {os.nice(0)}\n"))
    monkeypatch.setattr(data, "helper_niceness", lambda device: 2)
    reader = StoreReader(store)
    got, sizes = collect(StreamSplit(reader, "train", NAMES, CPU, workers=2, window_samples=4).batches(3))
    workers = dict(line.split() for line in started.read_text().splitlines())
    assert len(workers) == 2 and str(os.getpid()) not in workers, workers
    assert set(workers.values()) == {str(min(own + 2, 19))} and os.nice(0) == own, workers
    np.testing.assert_array_equal(got["keys"], reader.read(reader.split_indices("train"), ("keys",))["keys"])


def test_stream_readers_are_started_once_for_every_epoch_of_both_splits_and_stop_with_them(store, tmp_path,
                                                                                           monkeypatch):
    """Persistent readers: three shuffled train epochs and a validation pass after each are read by the same two
    reader processes (one pool shared by train and val, each reader starting once), with the batches of
    in-process reading; once both splits are gone the readers have exited and the slot file is removed."""
    import gc
    import os

    from fpt.store import shared
    from fpt.train import data

    started = tmp_path / "started"
    monkeypatch.setattr(shared, "reuse_freed_memory", lambda: started.open("a").write(f"{os.getpid()}\n"))
    reader = StoreReader(store)
    streamed = {s: StreamSplit(reader, s, NAMES, CPU, workers=2, window_samples=4) for s in ("train", "val")}
    plain = {s: StreamSplit(reader, s, NAMES, CPU, workers=0, window_samples=4) for s in ("train", "val")}
    for epoch in range(3):
        for split in ("train", "val"):
            shuffle = split == "train"
            got, sizes = collect(streamed[split].batches(3, shuffle, np.random.default_rng(epoch)))
            want, want_sizes = collect(plain[split].batches(3, shuffle, np.random.default_rng(epoch)))
            assert sizes == want_sizes and all(np.array_equal(got[n], want[n]) for n in want)
    assert streamed["train"].readers is streamed["val"].readers is not None
    pids = [int(p) for p in started.read_text().split()]
    assert len(pids) == 2 and os.getpid() not in pids
    assert [key for key in data._READERS if key[0] == str(reader.path)]
    del streamed
    gc.collect()
    for pid in pids:                                          # exited and reaped by the DataLoader
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"fpt-shared-{os.getpid()}-")]
    assert not [key for key in data._READERS if key[0] == str(reader.path)]      # nothing holds a pool of it
    # a split of fewer windows than readers asked for starts one per window (val here: 2 samples, one window)
    open(started, "w").close()
    val = StreamSplit(reader, "val", NAMES, CPU, workers=8, window_samples=4)
    collect(val.batches(3))
    assert val.readers.workers == 1 and len(started.read_text().split()) == 1


def test_an_epoch_left_unfinished_gives_way_to_the_next_and_fails_if_resumed(store):
    """A generator of an epoch that another epoch superseded raises rather than hand on the other's windows;
    the next epoch after an unfinished one reads with new readers and gives every batch."""
    reader = StoreReader(store)
    split = StreamSplit(reader, "train", NAMES, CPU, workers=2, window_samples=4)
    want, want_sizes = collect(StreamSplit(reader, "train", NAMES, CPU, window_samples=4).batches(3))
    first = split.batches(3)
    next(first)
    got, sizes = collect(split.batches(3))                    # supersedes ``first``
    assert sizes == want_sizes and np.array_equal(got["keys"], want["keys"])
    with pytest.raises(RuntimeError, match="another epoch"):
        list(first)
    pool = split.readers
    assert pool.broken                                        # the epoch that failed took its pool with it
    got, sizes = collect(split.batches(3))
    assert split.readers is not pool and sizes == want_sizes and np.array_equal(got["keys"], want["keys"])


def test_stream_order_does_not_depend_on_the_number_of_workers(store):
    reader = StoreReader(store)
    a, _ = collect(StreamSplit(reader, "train", NAMES, CPU, 0, 4).batches(3, True, np.random.default_rng(5)))
    b, _ = collect(StreamSplit(reader, "train", NAMES, CPU, 2, 4).batches(3, True, np.random.default_rng(5)))
    np.testing.assert_array_equal(a["keys"], b["keys"])


def test_a_split_streamed_from_a_thread_other_than_the_main_one_never_forks(store, monkeypatch):
    """A sweep's runs in threads read their test split with the prefetch thread: forking a process whose other
    threads may hold locks is unsafe (lease 5: filelock refused it). From the main thread, workers fork."""
    import os
    import threading

    def no_fork():
        raise RuntimeError("forked")

    reader = StoreReader(store)
    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(RuntimeError, match="forked"):
        collect(StreamSplit(reader, "train", NAMES, CPU, workers=2, window_samples=4).batches(3))
    results = []
    thread = threading.Thread(target=lambda: results.append(
        collect(StreamSplit(reader, "train", NAMES, CPU, workers=2, window_samples=4).batches(3))))
    thread.start()
    thread.join()
    expected = reader.read(reader.split_indices("train"), NAMES)
    assert results and results[0][1] == [3, 3, 3, 1]
    np.testing.assert_array_equal(results[0][0]["keys"], expected["keys"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_store_error_while_streaming_is_one_line(store, monkeypatch, workers):
    def store_gone(*args, **kwargs):
        raise FptError("s3://b/x.zarr: cannot reach the store (ConnectionError)")

    monkeypatch.setattr(StoreReader, "read", store_gone)                  # inherited by forked workers
    stream = StreamSplit(StoreReader(store), "train", NAMES, CPU, workers=workers, window_samples=4)
    with pytest.raises(FptError) as e:
        next(iter(stream.batches(3)))
    assert str(e.value) == "s3://b/x.zarr: cannot reach the store (ConnectionError)"       # no traceback text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_windows_rows_in_their_order_cut_into_batches(store, device, workers):
    """Whatever the batch size against the windows (a batch may take rows from several), an epoch's batches are
    the windows' rows, each window in its own shuffled order, one window after another, cut into batches (the
    last one partial unless drop_last): the plain definition, against the batches gathered from each window
    where it went (on CUDA the device, a CPU the host)."""
    from itertools import product

    reader = StoreReader(store)
    every = reader.read(np.arange(reader.geometry.n_samples), NAMES)
    split = StreamSplit(reader, "train", NAMES, torch.device(device), workers=workers, window_samples=4)
    for batch_size, shuffle, drop_last in product((1, 3, 4, 7, 11), (False, True), (False, True)):
        rng = np.random.default_rng(batch_size)
        rows = np.concatenate([w[rng.permutation(len(w))] if shuffle else w for w in split.windows(shuffle, rng)])
        cut = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        cut = cut[:-1] if drop_last and len(cut[-1]) < batch_size else cut
        got = list(split.batches(batch_size, shuffle, np.random.default_rng(batch_size), drop_last))
        assert [len(b["labels"]) for b in got] == [len(c) for c in cut], (batch_size, shuffle, drop_last)
        for batch, idx in zip(got, cut):
            assert all(t.device.type == device for t in batch.values())
            np.testing.assert_array_equal(batch["keys"].cpu().numpy(), every["keys"][idx])
            np.testing.assert_array_equal(batch["values"].cpu().numpy(), every["values"][idx])
            np.testing.assert_array_equal(batch["images"].cpu().numpy(), every["images"][idx].transpose(0, 3, 1, 2))
            np.testing.assert_array_equal(batch["labels"].cpu().numpy(), every["labels"][idx])


def test_streaming_reads_whole_shards_once_per_epoch(store, monkeypatch):
    reader = StoreReader(store)
    sps = reader.geometry.samples_per_shard
    train_idx = reader.split_indices("train")
    reads = []
    original = StoreReader.read
    monkeypatch.setattr(StoreReader, "read", lambda self, idx, names: reads.append(np.asarray(idx))
                        or original(self, idx, names))
    data = StreamSplit(reader, "train", NAMES, CPU, window_samples=4)
    list(data.batches(2, shuffle=True, rng=np.random.default_rng(0)))
    read = np.concatenate(reads)
    assert sorted(read.tolist()) == train_idx.tolist()                       # every sample read once
    for window in reads:                                             # a window = whole shards (their train part)
        shards = np.unique(window // sps)
        assert set(window.tolist()) == {i for i in train_idx.tolist() if i // sps in shards}


def test_streaming_on_cuda_starts_a_reader_per_core_but_two_within_a_quarter_of_the_free_ram(store, monkeypatch):
    """``default_workers``: on CUDA as many readers as cores less two (at most 16, at least 1), fewer where their
    slots and own memory would take more than a quarter of the available RAM; none on a CPU."""
    from types import SimpleNamespace

    from fpt.train import data

    window = 256 << 20
    per_reader = 4 * window + data.READER_OWN_BYTES          # two slots and two page-locked copies, each a window
    for cores, free, want in ((16, 512 << 30, 14), (64, 512 << 30, 16), (2, 512 << 30, 1), (16, 5 * per_reader * 4, 5),
                              (16, 0, 1)):
        monkeypatch.setattr(data.os, "cpu_count", lambda: cores)
        monkeypatch.setattr(data.psutil, "virtual_memory", lambda: SimpleNamespace(available=free))
        assert data.default_workers(torch.device("cuda"), window) == want, (cores, free)
        assert data.default_workers(CPU, window) == 0
    monkeypatch.setattr(data.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(data.psutil, "virtual_memory", lambda: SimpleNamespace(available=64 << 30))
    split = StreamSplit(StoreReader(store), "train", NAMES, torch.device("cuda"), workers=None)
    assert split.workers == data.default_workers(torch.device("cuda"), split.window_bytes) == 6      # 8 cores
    assert StreamSplit(StoreReader(store), "train", NAMES, CPU, workers=None).workers == 0


def test_cache_plan(store):
    reader = StoreReader(store)
    shapes = reader.geometry.sample_shapes()
    per_sample = sum(int(np.prod(shapes[n][0])) * np.dtype(shapes[n][1]).itemsize for n in NAMES)
    need = (10 + 4) * per_sample / 2**20
    auto = plan_cache(reader, NAMES, "auto", CPU)
    assert auto.mode == "ram" and auto.need_mb == pytest.approx(need) and "auto" in auto.reason
    tight = plan_cache(reader, NAMES, "auto", CPU, budget_mb=need / 2)
    assert tight.mode == "none" and "streaming" in tight.reason
    assert plan_cache(reader, NAMES, "none", CPU).mode == "none"
    assert plan_cache(reader, NAMES, "ram", CPU).mode == "ram"
    with pytest.raises(FptError, match="--cache gpu needs a CUDA training device"):
        plan_cache(reader, NAMES, "gpu", CPU)
    # a sweep's copy already on the device: used by auto and gpu (whatever the budget), not by ram or none
    for cache in ("auto", "gpu"):
        shared = plan_cache(reader, NAMES, cache, CPU, budget_mb=0, shared_on_device=True)
        assert shared.mode == "gpu" and "shared" in shared.reason
    assert plan_cache(reader, NAMES, "ram", CPU, shared_on_device=True).mode == "ram"
    assert plan_cache(reader, NAMES, "none", CPU, shared_on_device=True).mode == "none"


def test_cache_plan_on_cuda_takes_half_the_free_gpu_memory_by_default(store, monkeypatch):
    """``--cache auto`` on a CUDA device: the GPU when the splits fit half its free memory (the step needs the
    rest), else RAM; ``--cache gpu`` takes all the free memory, and is refused past it. (The free memory is the
    stand-in's: no GPU needed.)"""
    reader = StoreReader(store)
    cuda = torch.device("cuda")
    need = plan_cache(reader, NAMES, "none", CPU).need_mb
    for free_mb, auto, budget in ((3 * need, "gpu", 1.5 * need), (1.5 * need, "ram", None)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free_mb=free_mb: (free_mb * 2**20, 10 * 2**40))
        plan = plan_cache(reader, NAMES, "auto", cuda)
        assert plan.mode == auto, (free_mb / need, plan.reason)
        if budget is not None:
            assert plan.budget_mb == pytest.approx(budget)
        assert plan_cache(reader, NAMES, "gpu", cuda).mode == "gpu"                  # all of it when asked
        assert plan_cache(reader, NAMES, "auto", cuda, budget_mb=need).mode == "gpu"  # a budget given: that
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need / 2 * 2**20, 10 * 2**40))
    with pytest.raises(FptError, match="--cache gpu: .* exceed the free GPU memory"):
        plan_cache(reader, NAMES, "gpu", cuda)


def test_a_split_shared_as_tensor_handles_is_used_without_reading_the_store(store, monkeypatch):
    """SharedSplit.tensors rebuilds each array from the (rebuild, args) pair of reduce_tensor (on a GPU: a CUDA
    IPC handle; here a CPU tensor, in this process), and MemorySplit gathers its batches from those tensors
    without reading the store; a copy that does not match the split is ignored and the store read."""
    from torch.multiprocessing.reductions import reduce_tensor

    from fpt.train.data import SharedSplit, open_split

    reader = StoreReader(store)
    arrays = reader.read(reader.split_indices("train"), NAMES)
    with SharedArrays(arrays) as host:
        copy = SharedSplit(host, {0: {n: reduce_tensor(torch.from_numpy(a)) for n, a in arrays.items()}})
        cuda0 = torch.device("cuda", 0)
        assert copy.on(cuda0) and not copy.on(torch.device("cuda", 1)) and not copy.on(CPU)
        tensors = copy.tensors(cuda0)
        assert set(tensors) == {*NAMES, "labels"}
        read = []
        monkeypatch.setattr(StoreReader, "read", lambda self, *a: read.append(a) or arrays)
        data = MemorySplit(reader, "train", NAMES, CPU, on_device=True, tensors=tensors)
        assert data.shared and not read
        got, sizes = collect(data.batches(4))
        np.testing.assert_array_equal(got["keys"], arrays["keys"])
        np.testing.assert_array_equal(got["images"], arrays["images"].transpose(0, 3, 1, 2))
        # open_split takes the device copy only for a GPU cache on that device; elsewhere the host copy
        on_cpu = open_split(reader, "train", NAMES, "gpu", CPU, shared={"train": copy})
        assert on_cpu.shared and on_cpu.tensors["keys"].data_ptr() != tensors["keys"].data_ptr() and not read
    short = {n: t[:3] for n, t in tensors.items()}
    assert MemorySplit(reader, "train", NAMES, CPU, on_device=True, tensors=short).shared is False
    assert len(read) == 1


@pytest.mark.parametrize("mode, on_device", [("ram", False), ("gpu", True), ("none", False)])
def test_shuffled_batches_keep_every_sample_with_its_own_label(store, mode, on_device):
    """Each row of a shuffled batch is one train sample whole, its keys, values, image and label together (found by
    its keys), and every sample comes once: RAM (host take), device (index_select; the CPU stands in) and
    streamed windows alike."""
    reader = StoreReader(store)
    ref = reader.read(reader.split_indices("train"), NAMES)
    keys = torch.as_tensor(ref["keys"]).flatten(1)
    split = (MemorySplit(reader, "train", NAMES, CPU, on_device=True) if on_device
             else open_split(reader, "train", NAMES, mode, CPU, 0))
    seen = []
    for batch in split.batches(3, shuffle=True, rng=np.random.default_rng(5)):
        for i, row_keys in enumerate(batch["keys"].flatten(1)):
            (row,) = torch.nonzero((keys == row_keys).all(dim=1))[:, 0].tolist()
            assert int(batch["labels"][i]) == int(ref["labels"][row])
            assert torch.equal(batch["values"][i], torch.as_tensor(ref["values"][row]))
            assert torch.equal(batch["images"][i], torch.as_tensor(ref["images"][row]).permute(2, 0, 1))
            seen.append(row)
    assert sorted(seen) == list(range(len(keys))) and seen != sorted(seen)
    assert len(set(ref["labels"].tolist())) == 2                      # both classes: a swapped label shows


def test_cache_modes_train_to_the_same_evaluation(store, tmp_path):
    """Streaming and RAM cache see the same data: a checkpoint evaluates identically on either path."""
    from fpt.train import evaluate_checkpoint

    cfg = dict(side_res=16, epochs=1, batch_size=4, prompts=3, device="cpu")
    m = train(train_config(store, None, out=tmp_path / "r", cache="none", **cfg))
    assert m.data["cache"]["mode"] == "none"
    assert evaluate_checkpoint(store, tmp_path / "r" / "best.pt", "test", device="cpu").metrics["auc"] == m.test["auc"]
    assert train(train_config(store, None, out=tmp_path / "q", cache="ram", **cfg)).data["cache"]["mode"] == "ram"


def test_a_store_reader_killed_mid_run_is_one_clear_error_and_the_run_resumes(store, tmp_path, monkeypatch):
    """A streaming reader process killed in the second epoch (the OOM killer, say) ends the run with an FptError
    that says how to continue (not torch's RuntimeError); the same call then resumes and finishes the run."""
    import os
    import signal

    from fpt.train import data

    out, real = tmp_path / "r", data._WindowReads.__getitem__

    def killed_in_the_second_epoch(self, i):
        log = out / "log.jsonl"                 # its first line: the first epoch is done
        if torch.utils.data.get_worker_info() is not None and log.exists() and log.stat().st_size:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(data._WindowReads, "__getitem__", killed_in_the_second_epoch)
    cfg = train_config(store, None, out=out, cache="none", workers=1, side_res=16, epochs=3, batch_size=4,
                       prompts=3, device="cpu", checkpoint_seconds=0)
    with pytest.raises(FptError, match=rf"a store reader died \(DataLoader worker .*--resume {out}"):
        train(cfg)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(data._WindowReads, "__getitem__", real)
    train(cfg)
    assert [r["epoch"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [0, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cache_and_cuda_memory(store, tmp_path):
    m = train(train_config(store, None, out=tmp_path / "g", side_res=16, epochs=1, batch_size=4, prompts=3,
                           device="cuda", cache="gpu"))
    assert m.data["cache"]["mode"] == "gpu"
    assert m.throughput.memory_kind == "cuda_max_allocated" and m.throughput.peak_memory_mb > 0
    data = MemorySplit(StoreReader(store), "train", NAMES, torch.device("cuda"), on_device=True)
    assert data.tensors["keys"].is_cuda and next(data.batches(4))["keys"].is_cuda


# --- batched augmentation -----------------------------------------------------------------------------------

def images(n=4, res=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, res, res), dtype=np.uint8))


def test_identity_draw_is_the_evaluation_resize():
    side = SideInput(16, (0.5,) * 3, (0.25,) * 3)
    x = TF.resize(images(res=8).float() / 255, [32, 32], antialias=True)   # smooth images (real ones are)
    same = side.augment(x, AugmentParams.identity(4))
    resized = TF.resize(x, [16, 16], antialias=True)
    assert same.shape == (4, 3, 16, 16)
    assert (same - resized).abs().mean() < 0.01                          # bilinear of the antialiased image


def test_evaluation_input_is_torchvision_resize_then_normalize():
    """The side network's evaluation (and prediction) input, against torchvision's own transforms: antialiased
    resize of the uint8 image, scaled to [0, 1], normalised by the store's mean and std per channel."""
    import torchvision.transforms.v2 as T

    mean, std = (0.2, 0.5, 0.7), (0.1, 0.3, 0.25)
    batch = images(4, res=32)
    want = T.Compose([T.Resize([16, 16], antialias=True), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean, std)])(batch)
    torch.testing.assert_close(SideInput(16, mean, std)(batch, train=False), want, rtol=1e-5, atol=1e-5)


def test_flips_mirror_exactly():
    side = SideInput(16, (0.5,) * 3, (0.25,) * 3)
    x = images().float() / 255
    p = AugmentParams.identity(4)
    plain = side.augment(x, p)
    p.flip_x = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    p.flip_y = torch.tensor([1.0, 1.0, -1.0, -1.0])
    flipped = side.augment(x, p)
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))
    torch.testing.assert_close(flipped[1], plain[1])
    torch.testing.assert_close(flipped[2], plain[2].flip(-1).flip(-2))
    torch.testing.assert_close(flipped[3], plain[3].flip(-2))


def test_crop_takes_the_drawn_region():
    side = SideInput(16, (0.5,) * 3, (0.25,) * 3, augment=AugmentConfig(scale=(1.0, 1.0)))   # no pre-resize
    x = torch.zeros(1, 3, 16, 16)
    x[..., :8, 8:] = 1.0                                                   # top-right quadrant white
    p = AugmentParams.identity(1)
    p.crop_w, p.crop_h = torch.tensor([0.5]), torch.tensor([0.5])
    p.centre_x, p.centre_y = torch.tensor([0.5]), torch.tensor([-0.5])     # the top-right quadrant, magnified
    crop = side.augment(x, p)
    assert crop[..., 1:-1, 1:-1].min() > 0.99 and crop.mean() > 0.9      # (bilinear: the border blends a little)
    p.centre_x = torch.tensor([-0.5])                                     # the top-left quadrant: black
    assert side.augment(x, p)[..., 1:-1, 1:-1].max() < 0.01


def test_crop_grid_is_affine_grid():
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=2).sample(8)
    theta = torch.zeros(8, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = p.crop_w * p.flip_x, p.centre_x
    theta[:, 1, 1], theta[:, 1, 2] = p.crop_h * p.flip_y, p.centre_y
    want = torch.nn.functional.affine_grid(theta, [8, 3, 16, 16], align_corners=False)
    torch.testing.assert_close(crop_grid(p, 16), want)


def test_uint8_and_float_inputs_augment_alike():
    side = SideInput(16, (0.5,) * 3, (0.25,) * 3)
    batch, p = images(), AugmentParams.identity(4)
    assert (side.augment(batch, p) - side.augment(batch.float() / 255, p)).abs().max() < 2 / 255


def test_colour_jitter_matches_torchvision_per_image():
    x = images(3).float() / 255
    b, c, s = torch.tensor([0.8, 1.0, 1.2]), torch.tensor([1.2, 0.85, 1.0]), torch.tensor([0.9, 1.1, 1.0])
    got = colour_jitter(x, b, c, s)
    for i in range(3):
        want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], float(b[i])), float(c[i])),
                                    float(s[i]))
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_colour_jitter_in_each_images_order_matches_torchvision_in_that_order():
    x = images(6).float() / 255
    b, c, s = torch.full((6,), 1.2), torch.full((6,), 0.7), torch.full((6,), 1.3)
    order = jitter_order(torch.arange(6) / 6 + 0.01)                      # each of the six orders once
    got = colour_jitter(x, b, c, s, order)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(6):
        want = x[i]
        for kind in order[i].tolist():
            want = adjust[kind](want, float((b, c, s)[kind][i]))
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert len({tuple(o) for o in order.tolist()}) == 6
    two = jitter_order(torch.tensor([0.2, 0.7]), 2)                        # no saturation (the paper's): b, c
    got = colour_jitter(x[:2], b[:2], c[:2], None, two)
    for i, kinds in enumerate(two.tolist()):
        want = x[i]
        for kind in kinds:
            want = adjust[kind](want, float((b, c)[kind][i]))
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert two.tolist() == [[0, 1], [1, 0]]


def test_draws_are_per_image_seeded_and_in_range():
    a, b = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=3), SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=3)
    batch = images(64)
    torch.testing.assert_close(a(batch, train=True), b(batch, train=True))
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=4).sample(1000)
    area = p.crop_w * p.crop_h
    assert area.max() <= 1.0 and area.min() >= 0.6 * 0.99 and (p.crop_w / p.crop_h).min() >= 0.8 - 1e-6
    assert (p.centre_x.abs() <= 1 - p.crop_w + 1e-6).all() and len(p.brightness.unique()) > 900
    assert 0.4 < (p.flip_x < 0).float().mean() < 0.6 and p.brightness.min() >= 0.8 and p.saturation.max() <= 1.1
    out = a(batch, train=True)
    assert out.shape == (64, 3, 16, 16) and not torch.allclose(out[0], out[1])


def test_impossible_cache_is_refused_before_the_run_dir_exists(store, tmp_path):
    with pytest.raises(FptError, match="--cache gpu needs a CUDA training device"):
        train(train_config(store, None, out=tmp_path / "never", side_res=16, epochs=1, device="cpu", cache="gpu"))
    assert not (tmp_path / "never").exists()


def test_batches_kept_past_their_window_keep_their_samples(store):
    """On a CPU a streamed window's batches are gathered from the reader's slot it lies in, which the reader
    refills with a later window once the next one is asked for: each batch is memory of its own, never a view
    of the slot, so batches kept past their window (a list of the epoch's, here one sample each) hold their own
    samples, as those of a split read without reader processes."""
    from fpt.loader_slots import slots_per_worker

    reader = StoreReader(store)
    split = StreamSplit(reader, "train", NAMES, CPU, workers=1, window_samples=1)
    assert len(split.windows(False, None)) > slots_per_worker(pinned=False)  # a slot refilled within the epoch
    kept = list(split.batches(1))
    want = list(StreamSplit(reader, "train", NAMES, CPU, workers=0, window_samples=1).batches(1))
    assert len(kept) == len(want) == len(reader.split_indices("train"))
    for a, b in zip(kept, want):
        assert all(torch.equal(a[n], b[n]) for n in b)
