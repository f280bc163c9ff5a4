"""DataLoader workers' items through shared-memory slots reused from item to item (``fpt.loader_slots`` on
``fpt.store.WorkerSlots``): who may take and free a slot, the items arriving equal to the default way's, the
slots reused, the default way where a slot cannot serve, and extraction and streamed training giving the same
results with them."""
from __future__ import annotations

import errno
import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fpt import loader_slots as slots_module
from fpt.extract.encode import stack_batch
from fpt.extract.run import DecodedImages, decode_slot_bytes
from fpt.loader_slots import SlotItem, fill_slot, loader_slots, received, stack_in_slot
from fpt.store import StoreReader, WorkerSlots
from tests.conftest import micro_config, write_image_folder

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_worker_takes_only_its_own_slots_and_gets_one_back_only_once_it_is_given():
    slots = WorkerSlots(workers=2, per_worker=2, size=100)
    try:
        assert [slots.take(0), slots.take(0), slots.take(0)] == [0, 1, None]
        assert [slots.take(1), slots.take(1), slots.take(1)] == [2, 3, None]
        slots.give(1)
        assert slots.take(1) is None and slots.take(0) == 1
        assert slots.size == 4096 and os.path.getsize(slots.path) == 4096 + 4 * 4096
    finally:
        slots.close()
    assert not os.path.exists(slots.path)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_what_a_worker_process_writes_in_a_slot_is_what_this_process_reads(method):
    """Through a forked process (the DataLoader's default) and a spawned one (the slots pickled: their path)."""
    slots = WorkerSlots(workers=2, per_worker=1, size=10)
    try:
        # a builtin as the target: a spawned child imports fpt, not this test module
        child = multiprocessing.get_context(method).Process(
            target=exec, args=("slots.view(slots.take(1), 10)[:] = 7", {"slots": slots}))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert slots.view(1, 10).tolist() == [7] * 10 and slots.take(1) is None       # still the reader's
        slots.give(1)
        assert slots.take(1) == 1
        copy = pickle.loads(pickle.dumps(slots))
        assert copy.view(1, 10).tolist() == [7] * 10
    finally:
        slots.close()


def test_a_slot_whose_memory_cannot_be_reserved_is_never_used_again(monkeypatch):
    """A full /dev/shm refuses a slot's pages when its worker first takes it: no slot, not a SIGBUS later."""
    calls = []

    def full(fd, offset, length):
        calls.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    slots = WorkerSlots(workers=1, per_worker=2, size=100)
    try:
        monkeypatch.setattr(os, "posix_fallocate", full)
        assert slots.take(0) is None and slots.take(0) is None
        assert len(calls) == 2                      # each slot tried once
    finally:
        slots.close()
    slots = WorkerSlots(workers=1, per_worker=1, size=100)
    try:
        monkeypatch.delattr(os, "posix_fallocate")  # (macOS has none)
        assert slots.take(0) is None
    finally:
        slots.close()


class Frames:
    """An image source of random RGB frames (``ref`` indexes them)."""

    def __init__(self, n: int, size: int = 24, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.frames = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]

    def load(self, ref):
        return self.frames[ref]


def test_decode_workers_send_their_batches_through_a_few_reused_slots_equal_to_stacking_them_here(monkeypatch):
    """Twelve batches from two workers arrive as SlotItemes, each equal to collating it in this process, through
    at most the workers' six slots (no pinning thread: three each), all free again at the end."""
    n, batch = 36, 3
    with loader_slots(2, decode_slot_bytes(batch, 32), pinned=False) as slots:
        images = DecodedImages(Frames(n), list(range(n)), 32, "fail", slots=slots)
        here = DecodedImages(Frames(n), list(range(n)), 32, "fail")
        used = []
        real = SlotItem.take

        def take(self, pinned=False):
            used.append(self.index)
            return real(self, pinned)

        monkeypatch.setattr(SlotItem, "take", take)
        loader = DataLoader(images, batch_size=batch, num_workers=2, prefetch_factor=2, collate_fn=images.collate)
        for b, (high, errors) in enumerate(loader):
            assert isinstance(high, SlotItem) and errors == {}
            expected, _ = here.collate([here[i] for i in range(b * batch, (b + 1) * batch)])
            got = received(high)
            assert got.dtype == torch.uint8 and torch.equal(got, expected)
        assert len(used) == n // batch and set(used) <= set(range(6))
        assert all(slots.take(w) is not None for w in (0, 0, 0, 1, 1, 1))               # every slot given back


def test_a_batch_that_fits_no_free_slot_goes_the_default_way(monkeypatch):
    """Outside a worker, with every slot of the worker taken, or a batch bigger than a slot (16-bit RGB in fp32):
    ``stack_batch``, the same values."""
    class Worker:
        id = 0

    tensors = [torch.full((64, 64, 3), i, dtype=torch.uint8) for i in range(2)]
    with loader_slots(1, decode_slot_bytes(2, 64), pinned=True) as slots:
        assert isinstance(stack_in_slot(slots, stack_batch, tensors), torch.Tensor)        # not in a worker
        monkeypatch.setattr(slots_module, "get_worker_info", lambda: Worker())
        sent = [stack_in_slot(slots, stack_batch, tensors) for _ in range(3)]
        assert [type(s) for s in sent] == [SlotItem, SlotItem, torch.Tensor]
        assert all(torch.equal(received(s), torch.stack(tensors)) for s in sent)
        floats = [t.float() for t in tensors]
        assert isinstance(stack_in_slot(slots, stack_batch, floats), torch.Tensor)
    assert not os.path.exists(slots.path)


def test_no_slots_where_dev_shm_has_no_room_for_them_or_refuses_the_file(monkeypatch):
    """None (the DataLoader's own way) rather than slots in a file on disk, or an error."""
    with loader_slots(2, decode_slot_bytes(2, 8), pinned=True) as slots:
        assert isinstance(slots, WorkerSlots)
    monkeypatch.setattr(slots_module, "shm_has_room", lambda size: False)
    with loader_slots(2, decode_slot_bytes(2, 8), pinned=True) as slots:
        assert slots is None
    monkeypatch.undo()

    def refused(*args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(slots_module, "WorkerSlots", refused)
    with loader_slots(2, decode_slot_bytes(2, 8), pinned=True) as slots:
        assert slots is None


def test_the_loaders_pinning_thread_takes_a_slot_batch_into_page_locked_memory(monkeypatch):
    """What the DataLoader's pinning thread does with a collated item ``(SlotItem, errors)``: the batch taken
    with ``pinned=True``, the errors as they were (torch's own pinning function, run here)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    asked = []
    monkeypatch.setattr(SlotItem, "take", lambda self, pinned=False: asked.append(pinned) or torch.zeros(1))
    high, errors = pin_memory((SlotItem("path", 0, ((None, 0, (1,), torch.uint8),)), {1: "unreadable"}))
    assert asked == [True] and torch.equal(high, torch.zeros(1)) and errors == {1: "unreadable"}


@CUDA
def test_cuda_pinned_loader_gives_page_locked_batches_from_the_slots():
    n, batch = 12, 3
    with loader_slots(2, decode_slot_bytes(batch, 32), pinned=True) as slots:
        images = DecodedImages(Frames(n), list(range(n)), 32, "fail", slots=slots)
        here = DecodedImages(Frames(n), list(range(n)), 32, "fail")
        loader = DataLoader(images, batch_size=batch, num_workers=2, collate_fn=images.collate, pin_memory=True)
        for b, (high, _) in enumerate(loader):
            expected, _ = here.collate([here[i] for i in range(b * batch, (b + 1) * batch)])
            assert isinstance(high, torch.Tensor) and high.is_pinned() and torch.equal(high, expected)


def test_extraction_with_decode_workers_writes_the_same_store_through_the_slots(tmp_path, image_folder, monkeypatch):
    """Two decode workers, their batches through the slots (counted as the loop receives them), against no
    workers: every array of the store equal."""
    from fpt.extract import extract, run

    kinds = []
    real = run.received
    monkeypatch.setattr(run, "received", lambda high: kinds.append(type(high).__name__) or real(high))
    extract(micro_config(image_folder, tmp_path / "plain.zarr", workers=0))
    assert set(kinds) == {"Tensor"}
    kinds.clear()
    extract(micro_config(image_folder, tmp_path / "slots.zarr", workers=2))
    assert kinds and set(kinds) == {"SlotItem"}
    plain, slotted = StoreReader(tmp_path / "plain.zarr"), StoreReader(tmp_path / "slots.zarr")
    assert len(plain.ids) == len(slotted.ids) > 0
    names = ("keys", "values", "indices", "images")
    rows = range(len(plain.ids))
    for name, a in plain.read(rows, names).items():
        assert np.array_equal(a, slotted.read(rows, names)[name]), name
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"fpt-shared-{os.getpid()}-")]


def test_a_dict_of_tensors_crosses_in_one_slot_as_it_was(monkeypatch):
    """``fill_slot``, as a store reader sends a window: arrays of several dtypes and shapes (an empty one too)
    laid out in one slot, given back equal, with their dtypes (taken, or borrowed where they lie); None (the
    default way) outside a worker or where the item does not fit; a fill that fails gives its slot back."""
    class Worker:
        id = 1

    rng = np.random.default_rng(0)
    window = {"keys": torch.from_numpy(rng.standard_normal((3, 2, 5)).astype(np.float16)),
              "labels": torch.tensor([2, 0, 1]), "images": torch.from_numpy(rng.integers(0, 256, (3, 4, 4, 3),
                                                                                          dtype=np.uint8)),
              "none": torch.zeros((0, 7), dtype=torch.bfloat16)}
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in window.items()}

    def fill(views):
        for n, view in views.items():
            view.copy_(window[n])

    with loader_slots(2, 4096, pinned=True) as slots:
        assert fill_slot(slots, shapes, fill) is None                              # not in a worker
        monkeypatch.setattr(slots_module, "get_worker_info", lambda: Worker())
        sent = fill_slot(slots, shapes, fill)
        assert isinstance(sent, SlotItem) and sent.index in (2, 3)                 # worker 1's slots
        got = received(sent)
        assert got.keys() == window.keys()
        assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in window.items())
        # borrowed: the arrays where they lie, the slot given back only after the block
        sent = fill_slot(slots, shapes, fill)
        with sent.borrowed() as lent:
            assert all(torch.equal(lent[n], t) for n, t in window.items())
            assert slots._memory()[sent.index] == slots.TAKEN
        assert slots._memory()[sent.index] == slots.FREE
        assert fill_slot(slots, {"keys": ((4096,), torch.uint8), "labels": ((1,), torch.int64)}, fill) is None

        def fails(views):
            raise OSError("unreadable")

        with pytest.raises(OSError):
            fill_slot(slots, shapes, fails)
        assert [fill_slot(slots, shapes, fill).index for _ in range(2)] == [2, 3]  # both free again


def test_an_item_kept_past_its_loaders_slots_is_refused_not_read(monkeypatch):
    """A SlotItem names slots that its loader's ``with`` block closed: taking it is one clear error, never a read
    of memory that is gone (or was reused by a later loader)."""
    class Worker:
        id = 0

    monkeypatch.setattr(slots_module, "get_worker_info", lambda: Worker())
    with loader_slots(1, 4096, pinned=False) as slots:
        sent = fill_slot(slots, {None: ((4,), torch.uint8)}, lambda views: views[None].fill_(7))
        assert isinstance(sent, SlotItem)
    with pytest.raises(RuntimeError, match="whose slots this process has closed"):
        sent.take()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_streamed_windows_cross_from_their_readers_in_slots_and_give_the_same_batches(tmp_path, monkeypatch,
                                                                                       device):
    """``fpt train --cache none`` with two reader processes: every window arrives as a SlotItem, which on CUDA
    the pinning thread takes into page-locked memory and on a CPU the batches are gathered from where it lies
    (borrowed, no copy out first), and the epoch's batches equal those read in this process (no workers),
    shuffled the same."""
    from fpt.extract import extract
    from fpt.train import data

    out = tmp_path / "s.zarr"
    extract(micro_config(write_image_folder(tmp_path / "data", {"train": 7, "val": 1, "test": 1}), out,
                         samples_per_shard=3))
    taken, borrowed = [], []
    real_take, real_borrowed = SlotItem.take, SlotItem.borrowed
    monkeypatch.setattr(SlotItem, "take", lambda self, pinned=False: taken.append(pinned) or real_take(self, pinned))
    monkeypatch.setattr(SlotItem, "borrowed", lambda self: borrowed.append(self.index) or real_borrowed(self))
    names = ("images", "keys", "values")
    epochs = {}
    for workers in (0, 2):
        split = data.StreamSplit(StoreReader(out), "train", names, torch.device(device), workers=workers,
                                 window_samples=4)
        epochs[workers] = [{n: t.cpu().clone() for n, t in b.items()}
                           for b in split.batches(3, shuffle=True, rng=np.random.default_rng(5))]
    windows = len(split.windows(True, np.random.default_rng(5)))
    assert len(borrowed) == windows and taken == ([True] * windows if device == "cuda" else [])
    assert len(epochs[0]) == len(epochs[2]) == 5
    for a, b in zip(epochs[0], epochs[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
