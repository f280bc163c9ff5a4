"""Batches for the trainable models, read from the store, and the side network's batched augmentation.

Two ways to feed a split:
- in memory (``--cache ram|gpu``): the split's arrays are read once (contiguous slices, each chunk decompressed
  once) into RAM (numpy, batches gathered with ``take``) or onto the GPU (tensors, ``index_select``).
- streamed (``--cache none``): shards are read whole, a window of shards at a time, by DataLoader worker
  processes (or a prefetch thread with ``workers=0``) while the model trains on the previous window; with
  shuffling, the shard order and the samples inside each window are permuted.
``plan_cache`` decides between them for ``--cache auto`` and says why.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import queue
import threading
import weakref
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from fpt import FptError
from fpt.config import HOST_PROCESSES_MAX, AugmentConfig, helper_niceness
from fpt.loader_slots import PREFETCH, SlotItem, fill_slot, loader_slots, slots_per_worker
from fpt.store import StoreReader, WorkerSlots, open_shared, start_helper

WINDOW_BYTES = 256 << 20      # raw bytes per streamed read window (a few shards)
# The training augmentation's uniform random numbers per image (SideInput.params), by row: the crop's tries
# (area, aspect) as torchvision's RandomResizedCrop makes them, then its centre, the flips, the colour-jitter
# factors and the jitter's order
CROP_TRIES = 10               # torchvision: (area, aspect) drawn until a crop fits the image, at most 10 times
CENTRE_X, CENTRE_Y, HFLIP, VFLIP, BRIGHTNESS, CONTRAST, SATURATION, JITTER_ORDER = range(2 * CROP_TRIES,
                                                                                       2 * CROP_TRIES + 8)
DRAWS = 2 * CROP_TRIES + 8

Batch = dict[str, torch.Tensor]   # store array name -> tensor on the training device; images [B, 3, R, R] uint8


def sample_bytes(reader: StoreReader, names: tuple[str, ...]) -> int:
    """Raw bytes of one sample of the arrays ``names``."""
    shapes = reader.geometry.sample_shapes()
    return sum(int(np.prod(shapes[n][0])) * np.dtype(shapes[n][1]).itemsize for n in names)


TRAINING_SPLITS = ("train", "val")        # what a run holds while it trains (test is read once, at the end)


def training_bytes(reader: StoreReader, names: tuple[str, ...]) -> int:
    """Raw bytes of the arrays ``names`` over the ``TRAINING_SPLITS``."""
    return sum(len(reader.split_indices(s)) for s in TRAINING_SPLITS) * sample_bytes(reader, names)


@dataclass
class CachePlan:
    mode: str                 # "ram", "gpu" or "none" (stream)
    need_mb: float            # raw size of the train+val arrays the model reads
    budget_mb: float | None   # what the decision compared against
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def plan_cache(reader: StoreReader, names: tuple[str, ...], cache: str, device: torch.device,
               budget_mb: float | None = None, shared_on_device: bool = False) -> CachePlan:
    """Where the train and val splits live during training. ``auto``: on the GPU when they fit ``budget_mb``
    (default: half the free GPU memory), else in RAM when they fit (default: half the available RAM), else
    streamed from the store. Explicit ``ram``/``gpu`` are refused when the data cannot fit at all. ``cache`` is
    one of config.CACHE_MODES (TrainConfig checks it). ``shared_on_device``: a sweep holds the splits on
    ``device`` already (``SharedSplit``), so ``auto`` and ``gpu`` use that copy."""
    need = training_bytes(reader, names) / 2**20
    what = f"{'+'.join(TRAINING_SPLITS)} {', '.join(names)}: {need:,.1f} MB"
    free_ram = psutil.virtual_memory().available / 2**20
    free_gpu = torch.cuda.mem_get_info(device)[0] / 2**20 if device.type == "cuda" else None
    if cache == "none":
        return CachePlan("none", need, None, f"--cache none: streaming {what} from the store")
    if shared_on_device and cache in ("auto", "gpu"):
        return CachePlan("gpu", need, None, f"{cache}: {what} on {device}, one copy shared by the sweep's runs")
    if cache == "gpu":
        if free_gpu is None:
            raise FptError("--cache gpu needs a CUDA training device; use --cache ram or --device cuda")
        if need > free_gpu:
            raise FptError(f"--cache gpu: {what} exceed the free GPU memory ({free_gpu:,.0f} MB)")
        return CachePlan("gpu", need, free_gpu, f"--cache gpu: {what} on {device}")
    if cache == "ram":
        if need > free_ram:
            raise FptError(f"--cache ram: {what} exceed the available RAM ({free_ram:,.0f} MB)")
        return CachePlan("ram", need, free_ram, f"--cache ram: {what} in RAM")
    if free_gpu is not None:
        budget = budget_mb if budget_mb is not None else free_gpu / 2
        if need <= budget:
            return CachePlan("gpu", need, budget, f"auto: {what} fit the GPU budget ({budget:,.0f} MB) -> gpu")
    budget = budget_mb if budget_mb is not None else free_ram / 2
    if need <= budget:
        return CachePlan("ram", need, budget, f"auto: {what} fit the RAM budget ({budget:,.0f} MB) -> ram")
    return CachePlan("none", need, budget, f"auto: {what} exceed the budget ({budget:,.0f} MB) -> streaming")


READER_OWN_BYTES = 640 << 20     # a store reader's memory besides its slots: torch, zarr's chunk buffers (ViT-B/512,
                                 # dev box: 528-647 MB unique to it, 2026-11-28)


def default_workers(device: torch.device, window_bytes: int) -> int:
    """Reader processes for streaming. On CUDA one per core but two (the training loop's thread and the loader's
    pinning thread keep theirs), at most HOST_PROCESSES_MAX, and as many as a quarter of the available RAM holds
    (each reader: its slots and the page-locked copies the loader's pinning thread makes of what it has sent
    ahead, a window of ``window_bytes`` each, and ``READER_OWN_BYTES``). The step outruns them
    all: a reader reads a ViT-B/512 sample in ~5 ms of a dev-box core over a long epoch (``python -m
    fpt.bench.loader_slots stream``), so the four of the earlier default fed ~800 samples/s to a step that takes
    ~5,000 (an H200, lease 5). On CPU none: the cores train, and a prefetch thread overlaps reading
    (decompression releases the GIL)."""
    if device.type != "cuda":
        return 0
    per_reader = (slots_per_worker(pinned=True) + PREFETCH) * window_bytes + READER_OWN_BYTES
    fit = int(psutil.virtual_memory().available // 4 // per_reader)
    return max(1, min(HOST_PROCESSES_MAX, (os.cpu_count() or 1) - 2, fit))


class SplitData(Protocol):
    def __len__(self) -> int: ...

    def batches(self, batch_size: int, shuffle: bool = False, rng: np.random.Generator | None = None,
                drop_last: bool = False, reuse: bool = False) -> Iterator[Batch]: ...


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches of an epoch over ``n`` samples (``drop_last``: full batches only)."""
    return n // batch_size if drop_last else -(-n // batch_size)


@dataclass(frozen=True)
class SharedSplit:
    """A split a sweep read once for its local runs: its arrays in a ``SharedArrays`` file (``host``: path, spec)
    and, for runs that cache on a GPU, one copy on each GPU (``gpus``: device index -> array name -> CUDA IPC
    handle, made for this run by ``torch.multiprocessing.reductions.reduce_tensor``) that the run maps instead of
    copying. The sweep's process owns the copies and keeps them until its runs are done."""
    host: tuple[str, dict]
    gpus: dict[int, dict[str, tuple]] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """The host copy, read-only."""
        return open_shared(*self.host)

    def on(self, device: torch.device) -> bool:
        """Whether ``device`` holds a copy."""
        return device.type == "cuda" and _gpu_index(device) in self.gpus

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The copy on ``device`` (``on(device)``), mapped into this process (no copy)."""
        return {n: rebuild(*args) for n, (rebuild, args) in self.gpus[_gpu_index(device)].items()}


def _gpu_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


# splits a sweep holds in this process for its runs in threads: key -> split -> (host arrays, GPU index -> tensors)
PROCESS_SPLITS: dict[str, dict[str, tuple[dict[str, np.ndarray], dict[int, dict[str, torch.Tensor]]]]] = {}


@dataclass(frozen=True)
class ProcessSplit:
    """A split a sweep read once for its runs in threads of this process (``PROCESS_SPLITS[key][split]``): the
    host arrays and, on each GPU that holds one, a copy there; a run uses them as they are. Only the key travels
    (dask pickles a task's arguments, even for a worker in the same process)."""
    key: str
    split: str

    def arrays(self) -> dict[str, np.ndarray]:
        return PROCESS_SPLITS[self.key][self.split][0]

    def on(self, device: torch.device) -> bool:
        return device.type == "cuda" and _gpu_index(device) in PROCESS_SPLITS[self.key][self.split][1]

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        return PROCESS_SPLITS[self.key][self.split][1][_gpu_index(device)]


SharedSplits = dict[str, SharedSplit | ProcessSplit]       # split name -> its shared copy


def open_split(reader: StoreReader, split: str, names: tuple[str, ...], mode: str, device: torch.device,
               workers: int | None = None, shared: SharedSplits | None = None) -> SplitData:
    """The split's data, in memory (mode ram/gpu: from ``shared`` when it holds the split) or streamed (none)."""
    if mode in ("ram", "gpu"):
        on_device = mode == "gpu"
        copy = shared.get(split) if shared else None
        if copy is not None and on_device and copy.on(device):
            return MemorySplit(reader, split, names, device, on_device, tensors=copy.tensors(device))
        return MemorySplit(reader, split, names, device, on_device, arrays=copy.arrays() if copy else None)
    return StreamSplit(reader, split, names, device, workers)


def gather_rows(arrays: dict[str, np.ndarray] | dict[str, torch.Tensor], rows: np.ndarray | torch.Tensor,
                out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The rows ``rows`` of each array, [len(rows), ...]: numpy arrays by ``take`` (it copies rows at memory
    speed; torch's CPU index_select on fp16 is ~10x slower), tensors by ``index_select`` where they are (into
    ``out``'s tensors where given)."""
    out = out or {}
    return {n: torch.from_numpy(a.take(rows, axis=0)) if isinstance(a, np.ndarray)
            else torch.index_select(a, 0, rows, out=out.get(n)) for n, a in arrays.items()}


def _batch_on_device(arrays: dict[str, torch.Tensor], device: torch.device) -> Batch:
    """A batch's arrays on ``device``, its images [B, R, R, C] as stored -> [B, C, R, R] (a view)."""
    out = {n: t.to(device, non_blocking=True) for n, t in arrays.items()}
    if "images" in out:
        out["images"] = out["images"].permute(0, 3, 1, 2)                      # [B, R, R, C] -> [B, C, R, R]
    return out


class MemorySplit:
    """A split read once into RAM (numpy; a batch is a ``take`` of its rows, then one copy to the device) or,
    with ``on_device``, onto the training GPU (tensors; a batch is an ``index_select`` there). A sweep's shared
    copy of the split, as ``reader.read`` gives it, is used when its names and size match the split (``shared``):
    ``arrays`` (read-only views of host memory) or ``tensors`` (already on ``device``); else the split is read
    from the store."""

    def __init__(self, reader: StoreReader, split: str, names: tuple[str, ...], device: torch.device,
                 on_device: bool = False, arrays: dict[str, np.ndarray] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None):
        idx = reader.split_indices(split)
        given = tensors if tensors is not None else arrays
        self.shared = (given is not None and set(given) == {*names, "labels"}
                       and all(len(a) == len(idx) for a in given.values()))
        if not self.shared:
            arrays, tensors = reader.read(idx, names), None
        if on_device and tensors is None:
            # a shared copy is read-only: np.require copies it (once, on the host) rather than torch warning
            tensors = {n: torch.from_numpy(np.require(a, requirements="W")).to(device) for n, a in arrays.items()}
        self.arrays, self.tensors = (None, tensors) if on_device else (arrays, None)
        self.n, self.device = len(idx), device
        self.reused: dict[str, torch.Tensor] = {}      # where full batches are gathered with reuse (on the device)

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, shuffle: bool = False, rng: np.random.Generator | None = None,
                drop_last: bool = False, reuse: bool = False) -> Iterator[Batch]:
        """The split's batches in store order, or shuffled by ``rng``. ``reuse`` (on the device): every full
        batch is gathered into the same tensors, so a batch is valid until the next is drawn; a captured step
        then takes it where it is, with no copy of its own (one batch in device memory, not two)."""
        order = rng.permutation(self.n) if shuffle else np.arange(self.n)
        stop = batch_count(self.n, batch_size, drop_last) * batch_size
        if self.tensors is not None:     # the epoch's order goes to the device once; batches are gathered there
            order_t = torch.from_numpy(order).to(self.device)
            for start in range(0, stop, batch_size):
                rows = order_t[start:start + batch_size]
                into = self._reused_batch(batch_size) if reuse and len(rows) == batch_size else None
                yield _batch_on_device(gather_rows(self.tensors, rows, into), self.device)
            return
        for start in range(0, stop, batch_size):
            yield _batch_on_device(gather_rows(self.arrays, order[start:start + batch_size]), self.device)

    def _reused_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        if any(len(t) != batch_size for t in self.reused.values()):
            self.reused = {}
        if not self.reused:
            self.reused = {n: t.new_empty((batch_size, *t.shape[1:])) for n, t in self.tensors.items()}
        return self.reused


class _WindowReads(Dataset):
    """Item ``window`` (sorted store indices, whole shards: what ``_EpochWindows`` hands out) = its arrays: dict of
    CPU tensors (in a reader process with ``slots``, a ``SlotItem`` of them), or ``{"error": message}`` so that
    a store problem in a worker process reaches the user as one clear line."""

    def __init__(self, path: Path, names: tuple[str, ...], slots: WorkerSlots | None = None):
        self.path, self.names = path, names
        self.slots = slots              # a reader process puts its windows there (``fpt.loader_slots``)
        self._reader: StoreReader | None = None

    def __getitem__(self, window: np.ndarray) -> dict[str, torch.Tensor] | SlotItem:
        try:
            if self._reader is None:                                           # one reader per worker process
                self._reader = StoreReader(self.path)
            shapes = {name: ((len(window), *shape), torch.from_numpy(np.empty(0, dtype)).dtype)   # torch's dtype
                      for name, (shape, dtype) in self._reader.row_layout(self.names).items()}
            # decompressed straight into the slot it crosses in; where there is none, read as usual
            sent = fill_slot(self.slots, shapes, lambda views: self._reader.read(
                window, self.names, out={name: view.numpy() for name, view in views.items()}))
            if sent is not None:
                return sent
            arrays = self._reader.read(window, self.names)
        except FptError as e:
            return {"error": str(e)}
        return {n: torch.from_numpy(a) for n, a in arrays.items()}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}


def _prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Iterate ``items`` in a background thread, ``depth`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:   # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():                                               # unblock a waiting put
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def may_fork_readers() -> bool:
    """Whether a split may be read by worker processes forked from this one (else by a prefetch thread). Not in
    a daemonic process (a dask worker), which may not start any; not from a thread other than the main one (a
    sweep's runs in threads): forking copies whatever lock another thread holds at that moment, held for good in
    the child (on the GPU machine filelock refused such a fork, lease 5)."""
    return not multiprocessing.current_process().daemon and threading.current_thread() is threading.main_thread()


class _EpochWindows(Sampler):
    """The read windows of the current epoch, as a DataLoader's sampler: what its persistent workers read next."""

    def __init__(self):
        self.windows: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.windows)

    def __len__(self) -> int:
        return len(self.windows)


class StreamReaders:
    """A store's reader processes for streamed splits, kept from epoch to epoch (persistent DataLoader workers)
    and shared by the splits of a run that stream the same arrays (train and val: ``stream_readers``). Each epoch
    hands them its windows (``epoch``); before, every epoch and every validation pass forked its readers anew
    from the training process, and each refilled its memory from nothing (dev box: a reader's CPU per ViT-B/512
    sample 8.4-8.7 ms over 128-sample epochs, 4.9-5.0 over 512-sample ones, ``fpt.bench.loader_slots``).

    One epoch at a time: starting one ends the one before (a generator of the earlier one then fails if
    resumed). A reader that dies takes the pool with it: the next epoch starts new ones. The processes stop, and
    the slot file goes, when the last split holding the pool goes: first the processes, then the file. Not for a
    process that may not fork them (``may_fork_readers``)."""

    def __init__(self, path: Path, names: tuple[str, ...], device: torch.device, workers: int, window_bytes: int):
        self.workers, self.window_bytes, self.pinned = workers, window_bytes, device.type == "cuda"
        stack = ExitStack()
        # a window crosses from its reader in one of the reader's slots, reused from window to window
        slots = stack.enter_context(loader_slots(workers, window_bytes, self.pinned))
        self.sampler = _EpochWindows()
        # each reader's chunks and windows reuse its memory (dev box, a window of 5 ViT-B/512 shards: 6.0-6.3
        # -> 3.8-4.4 CPU ms per sample, fpt.bench.store_read); on CUDA the readers, one per core but two, yield
        # the cores to this process, which drives the GPU (helper_niceness)
        loader = DataLoader(_WindowReads(path, names, slots), sampler=self.sampler, batch_size=None,
                            num_workers=workers, persistent_workers=True, prefetch_factor=PREFETCH,
                            pin_memory=self.pinned,
                            worker_init_fn=partial(start_helper, niceness=helper_niceness(device)))
        # held here only (not by the pool's own attributes), so that the finaliser can drop the loader (its
        # workers stop) before it closes the slots
        self._parts = {"loader": loader, "slots": stack}
        weakref.finalize(self, _close_readers, self._parts)
        self.epochs = 0
        self.broken = False

    def epoch(self, windows: list[np.ndarray]) -> Iterator[dict[str, torch.Tensor] | SlotItem]:
        """The items of ``windows``, in order, from the readers."""
        self.epochs += 1
        mine = self.epochs
        self.sampler.windows = windows
        try:
            for item in self._parts["loader"]:
                self._check(mine)
                yield item
            self._check(mine)
        except BaseException:
            # a reader killed, or the epoch left unfinished (its last items would be read and dropped, their
            # slots never given back): the next epoch starts new readers, and these stop with their last holder
            self.broken = True
            raise

    def _check(self, epoch: int) -> None:
        if self.epochs != epoch:
            raise RuntimeError("these store readers have begun another epoch since this one")


def _close_readers(parts: dict) -> None:
    parts.pop("loader", None)                        # its persistent iterator goes: the readers stop
    parts.pop("slots").close()


_READERS: "weakref.WeakValueDictionary[tuple, StreamReaders]" = weakref.WeakValueDictionary()


def stream_readers(path: Path, names: tuple[str, ...], device: torch.device, workers: int,
                   window_bytes: int) -> StreamReaders:
    """The reader pool of this process for these arrays of the store at ``path``, made on first use with
    ``workers`` readers and shared, as it is, while a split holds it (a broken one, or one with smaller slots,
    is replaced)."""
    key = (str(path), names, str(device), os.getpid())
    readers = _READERS.get(key)
    if readers is None or readers.broken or readers.window_bytes < window_bytes:
        readers = _READERS[key] = StreamReaders(path, names, device, workers, window_bytes)
    return readers


class StreamSplit:
    """A split streamed from the store a window of whole shards at a time.

    Reading whole shards decompresses every chunk once and reads every shard index once per epoch. With
    ``shuffle`` the shard order is permuted, then the samples of each window (plus the previous window's
    remainder); the order depends only on ``rng``, not on the number of workers: reader processes (None:
    ``default_workers``; 0, or where this process may not fork them, ``may_fork_readers``: a prefetch thread).
    """

    def __init__(self, reader: StoreReader, split: str, names: tuple[str, ...], device: torch.device,
                 workers: int | None = 0, window_samples: int | None = None):
        self.path, self.names, self.device = reader.path, names, device
        indices = reader.split_indices(split)
        shard_of = indices // reader.geometry.samples_per_shard
        self.shards = [indices[shard_of == s] for s in np.unique(shard_of)]   # sorted store indices per shard
        self.n = len(indices)
        self.window_samples = window_samples or max(1, WINDOW_BYTES // sample_bytes(reader, names))
        # the largest window ``windows`` can make of any split (shards added until it holds window_samples), with
        # its labels and each array 64-byte aligned: the size of a reader's slots, the same for every split
        longest = self.window_samples - 1 + reader.geometry.samples_per_shard
        per_sample = sample_bytes(reader, names) + reader.labels.itemsize
        self.window_bytes = longest * per_sample + 64 * (len(names) + 1)
        workers = default_workers(device, self.window_bytes) if workers is None else workers
        self.workers = workers if may_fork_readers() else 0
        self.readers: StreamReaders | None = None         # started by the first epoch (``stream_readers``)

    def __len__(self) -> int:
        return self.n

    def windows(self, shuffle: bool, rng: np.random.Generator | None) -> list[np.ndarray]:
        order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        windows, current = [], []
        for s in order:
            current.append(self.shards[s])
            if sum(map(len, current)) >= self.window_samples:
                windows.append(np.sort(np.concatenate(current)))
                current = []
        if current:
            windows.append(np.sort(np.concatenate(current)))
        return windows

    def _window_arrays(self, windows: list[np.ndarray]) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """Each window's arrays, and whether they are borrowed: still in their reader's slot, which is refilled
        once the next window is asked for (so nothing of them may be kept past that)."""
        if self.workers == 0:
            reads = _WindowReads(self.path, self.names)
            yield from ((arrays, False) for arrays in _prefetched(reads[w] for w in windows))
            return
        if self.readers is None or self.readers.broken:
            # no more readers than windows: a small split (a test split read once at the end of a run) forks few
            self.readers = stream_readers(self.path, self.names, self.device, min(self.workers, len(windows)),
                                          self.window_bytes)
        for item in self.readers.epoch(windows):
            if not isinstance(item, SlotItem):          # pinned (on CUDA), or sent the DataLoader's way
                yield item, False
                continue
            # on a CPU the batches are gathered from the slot itself: no copy of the window out of it first
            # (a fresh 256 MB each window, dev box: ~2 ms more of the training thread per ViT-B/512 sample)
            with item.borrowed() as arrays:
                yield arrays, True

    def batches(self, batch_size: int, shuffle: bool = False, rng: np.random.Generator | None = None,
                drop_last: bool = False, reuse: bool = False) -> Iterator[Batch]:
        """The split's batches, a window at a time, each window's samples shuffled by ``rng`` (after the window
        order) or in store order; the rows of a window that do not fill a batch begin the next window's first.
        A window goes to the training device whole (``_Window``) and its batches are gathered from it there: on
        a GPU the host copies a sample once (into page-locked memory, on the loader's pinning thread) instead of
        three times more (the window shuffled, joined to the rows before it, each batch staged for the device).
        ``reuse`` has no effect here: each batch is a tensor of its own, or a view of its window."""
        carry: dict[str, torch.Tensor] | None = None        # the last window's rows still to go (training device)
        for arrays, borrowed in self._window_arrays(self.windows(shuffle, rng)):
            if "error" in arrays:
                raise FptError(arrays["error"])
            window = _Window(arrays, self.device, rng.permutation(len(arrays["labels"])) if shuffle else None,
                             borrowed)
            first = 0
            if carry is not None:
                first = min(batch_size - len(carry["labels"]), len(window))
                carry = {n: torch.cat([carry[n], t]) for n, t in window.rows(0, first).items()}
                if len(carry["labels"]) < batch_size:
                    continue
                yield _batch_on_device(carry, self.device)
                carry = None
            stop = first + (len(window) - first) // batch_size * batch_size
            for start in range(first, stop, batch_size):
                yield _batch_on_device(window.rows(start, start + batch_size), self.device)
            if stop < len(window):           # a copy of its own, so that the window's memory can go
                carry = {n: t.clone() for n, t in window.rows(stop, len(window)).items()}
            del window                       # before the next window arrives (one window on the device, not two)
        if carry is not None and not drop_last:
            yield _batch_on_device(carry, self.device)


class _Window:
    """A read window's arrays where the batches are gathered from: on a CPU as they were read (numpy arrays,
    gathered with ``take``); on a GPU copied there whole (from the page-locked memory the loader put them in: no
    host copy) and gathered with ``index_select``. ``order``: the window's rows in the order batches take them
    (None: as stored). ``borrowed`` arrays (still in their reader's slot) are never handed on as views: every
    batch is gathered into memory of its own."""

    def __init__(self, arrays: dict[str, torch.Tensor], device: torch.device, order: np.ndarray | None,
                 borrowed: bool = False):
        self.on_host = device.type == "cpu"
        if self.on_host:
            self.arrays = {n: t.numpy() for n, t in arrays.items()}
            self.order = np.arange(len(arrays["labels"])) if order is None and borrowed else order
        else:
            self.arrays = {n: t.to(device, non_blocking=True) for n, t in arrays.items()}
            self.order = None if order is None else torch.from_numpy(order).to(device)
        self.n = len(arrays["labels"])

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows start:stop of the window's order, [stop - start, ...] each (views where it is the stored one)."""
        if self.order is None:
            return {n: torch.as_tensor(a[start:stop]) for n, a in self.arrays.items()}
        return gather_rows(self.arrays, self.order[start:stop])


@dataclass
class AugmentParams:
    """Per-image augmentation draws, [B] each: crop width/height as a fraction of the image side, crop centre
    in [-1, 1] image coordinates, flips (+1 keep, -1 mirror) and colour-jitter factors."""
    crop_w: torch.Tensor
    crop_h: torch.Tensor
    centre_x: torch.Tensor
    centre_y: torch.Tensor
    flip_x: torch.Tensor
    flip_y: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    jitter_order: torch.Tensor | None = None    # [B, n] the adjustments' order (jitter_order); None: b, c, s

    @classmethod
    def identity(cls, n: int) -> "AugmentParams":
        one, zero = torch.ones(n), torch.zeros(n)
        return cls(one, one, zero, zero, one, one, one, one, one)


def resized_crop_size(area: torch.Tensor, aspect: torch.Tensor, ratio: tuple[float, float]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop on a square image, batched: the first of the tries (area, aspect) [T, B]
    whose crop fits the image, else (no try fits) the whole image at the nearest aspect in ``ratio``. Returns the
    crop's width and height [B] as fractions of the image side."""
    w, h = (area * aspect).sqrt(), (area / aspect).sqrt()                     # [T, B]
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(dim=0, keepdim=True)                          # the first that fits (0 if none)
    fallback = min(max(1.0, ratio[0]), ratio[1])                              # torchvision's central crop
    found = fits.any(dim=0)
    return (torch.where(found, w.gather(0, first)[0], min(1.0, fallback)),
            torch.where(found, h.gather(0, first)[0], min(1.0, 1 / fallback)))


def crop_grid(p: AugmentParams, r: int) -> torch.Tensor:
    """The sampling grid [B, r, r, 2] of every image's crop and flips: what ``F.affine_grid`` builds for the
    axis-aligned maps u -> centre + half-size · flip · u (output pixel centres u in [-1, 1]), by broadcasting."""
    B = len(p.crop_w)
    u = (torch.arange(r, dtype=torch.float32, device=p.crop_w.device) * 2 + 1) / r - 1  # [r]
    gx = p.centre_x[:, None] + (p.crop_w * p.flip_x)[:, None] * u                         # [B, r]
    gy = p.centre_y[:, None] + (p.crop_h * p.flip_y)[:, None] * u                         # [B, r]
    return torch.stack([gx[:, None, :].expand(B, r, r), gy[:, :, None].expand(B, r, r)], dim=-1)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor · image + (1 - factor) · other, clamped to [0, 1] (torchvision's colour-jitter blend), per image."""
    f = factor.view(-1, 1, 1, 1)
    return (f * image + (1 - f) * other).clamp(0, 1)


def jitter_order(u: torch.Tensor, kinds: int = 3) -> torch.Tensor:
    """Uniform draws [B] -> each image's order [B, kinds] of the first ``kinds`` jitter adjustments (0 brightness,
    1 contrast, 2 saturation), every order equally likely, as torchvision's ColorJitter draws one per image among
    those it applies (by arithmetic on the device, which a captured step can replay: for 3, k = 0..5 gives 012,
    021, 102, 120, 201, 210; for 2, 01 and 10)."""
    if kinds == 2:
        first = (u * 2).long().clamp(max=1)
        return torch.stack([first, 1 - first], dim=1)
    k = (u * 6).long().clamp(max=5)
    first = k // 2
    low, high = (first == 0).long(), 2 - (first == 2).long()          # the other two, in increasing order
    swap = k % 2 == 1
    return torch.stack([first, torch.where(swap, high, low), torch.where(swap, low, high)], dim=1)


GREY = (0.2989, 0.587, 0.114)     # torchvision's rgb_to_grayscale weights


def colour_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's brightness, contrast and saturation adjustments with a factor per image, for a batch, in
    each image's ``order`` [B, n] (0 brightness, 1 contrast, 2 saturation; None: that order for every image).
    ``saturation`` None: not applied (the paper's jitter has none), n = 2. x float [B, 3, H, W] in [0, 1];
    factors [B] -> [B, 3, H, W]. Each adjustment is a blend towards its own target (black, the image's mean grey,
    its grey image), so one blend per step serves every image; the mean grey from the channel means."""
    factors = torch.stack([brightness, contrast] + ([] if saturation is None else [saturation]), dim=1)  # [B, n]
    n = factors.shape[1]
    if order is None:
        order = torch.arange(n, device=x.device).expand(len(x), n)
    for step in range(n):
        kind = order[:, step].view(-1, 1, 1, 1)
        means = x.mean(dim=(-2, -1))                                                           # [B, 3]
        mean_grey = sum(w * means[:, c] for c, w in enumerate(GREY)).view(-1, 1, 1, 1)        # [B, 1, 1, 1]
        target = torch.where(kind == 1, mean_grey, 0.0)
        if saturation is not None:
            target = torch.where(kind == 2, TF.rgb_to_grayscale(x), target)                   # [B, 1, H, W]
        x = _blend(x, target, factors.gather(1, order[:, step:step + 1])[:, 0])
    return x


class SideInput:
    """uint8 low-res images [B, 3, R, R] -> normalised float side-network input [B, 3, r, r], on their device.

    Training: the ``augment`` settings (default: the paper's) drawn per image: random resized crop, horizontal
    and vertical flips, colour jitter; applied to the whole batch at once: an antialiased resize (torchvision v2
    on tensors), one ``grid_sample`` for every image's crop + flips, and the colour jitter as batched blends.
    The draws come from a generator seeded with ``seed``. Evaluation: resize only.
    """

    def __init__(self, side_res: int, mean, std, seed: int = 0, augment: AugmentConfig | None = None):
        self.side_res, self.augment_cfg = side_res, augment or AugmentConfig()
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to(self, device: torch.device | str) -> "SideInput":
        """Keep the normalisation constants on ``device`` (once, not per batch). ``TrainStep`` calls it before
        compiling: moving them inside the compiled function would change its state and so recompile it on the
        next call."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, images: torch.Tensor, train: bool, draws: torch.Tensor | None = None) -> torch.Tensor:
        """``draws`` [DRAWS, B] (``draw``), on the images' device: the training augmentation's random numbers;
        drawn here from the generator when not given."""
        if train:
            x = self.augment(images, self.sample(len(images)) if draws is None else self.params(draws))
        else:
            x = images
            if x.shape[-1] != self.side_res or x.shape[-2] != self.side_res:
                x = TF.resize(x, [self.side_res, self.side_res], antialias=True)
            x = x.float() / 255.0
        if self.mean.device != x.device:
            self.to(x.device)
        return (x - self.mean) / self.std

    def draw(self, steps: int, n: int) -> torch.Tensor:
        """The uniform random numbers of ``steps`` batches of ``n`` images, [steps, DRAWS, n], from the generator
        (on the CPU: one call, so a whole epoch's draws can go to the device at once)."""
        return torch.rand(steps, DRAWS, n, generator=self.generator)

    def params(self, u: torch.Tensor) -> AugmentParams:
        """Uniform draws [DRAWS, n] in [0, 1) -> the per-image augmentation, on their device (no host work)."""
        def uniform(row: int, lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * u[row]

        a = self.augment_cfg
        tries = u[:2 * CROP_TRIES].view(CROP_TRIES, 2, -1)                   # [T, (area, aspect), n]
        area = a.scale[0] + (a.scale[1] - a.scale[0]) * tries[:, 0]
        log_lo, log_hi = math.log(a.ratio[0]), math.log(a.ratio[1])
        w, h = resized_crop_size(area, torch.exp(log_lo + (log_hi - log_lo) * tries[:, 1]), a.ratio)
        centre_x, centre_y = (1 - w) * uniform(CENTRE_X, -1, 1), (1 - h) * uniform(CENTRE_Y, -1, 1)
        flip_x, flip_y = (torch.where(u[row] < p, -1.0, 1.0) for row, p in ((HFLIP, a.hflip), (VFLIP, a.vflip)))
        jitter = lambda row, x: uniform(row, max(0.0, 1 - x), 1 + x)  # noqa: E731
        order = jitter_order(u[JITTER_ORDER], 3 if a.saturation else 2)
        return AugmentParams(w, h, centre_x, centre_y, flip_x, flip_y, jitter(BRIGHTNESS, a.brightness),
                             jitter(CONTRAST, a.contrast), jitter(SATURATION, a.saturation), order)

    def sample(self, n: int) -> AugmentParams:
        """One batch's augmentation for ``n`` images, drawn from the generator."""
        return self.params(self.draw(1, n)[0])

    def augment(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """images [B, 3, R, R] (uint8, or float in [0, 1]) -> float [B, 3, r, r] in [0, 1]: crop + flips by one
        bilinear grid sample for the whole batch, then the colour jitter."""
        r, device = self.side_res, images.device
        work = min(images.shape[-1], math.ceil(r / math.sqrt(self.augment_cfg.scale[0])))
        if work < images.shape[-1]:     # antialias first: the bilinear sampling below then shrinks by <= 1/sqrt(scale)
            images = TF.resize(images, [work, work], antialias=True)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        x = F.grid_sample(x, crop_grid(p, r).to(device), mode="bilinear", padding_mode="border", align_corners=False)
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        saturation = to(p.saturation) if self.augment_cfg.saturation else None     # the paper's jitter: none
        return colour_jitter(x, to(p.brightness), to(p.contrast), saturation, to(p.jitter_order))
