"""Arrays handed to other processes on this machine through memory-mapped files: a shard's arrays to a writer
process (``HandoverSlots``, ``write_shared_shard``), a store split to the concurrent runs of a sweep
(``SharedArrays``); and back from them: what DataLoader workers send (``WorkerSlots``).

Why processes: zarr runs every synchronous call of a process on one event-loop thread, and that thread does part
of each write itself (the bytes and checksum codecs, assembling the shard from its encoded chunks: memory copies
proportional to the data). Measured on the dev box, about 2 ms per MB of K/V: one core's worth, about 500 MB/s,
which is what ``fpt extract`` reached on an H100 machine (ViT-B: 111 images/s at 512, 33 at 1024, whatever the
number of writer threads). Each writer process has its own event loop, so writes scale with the cores.

Transport: the arrays are in a file under /dev/shm (the temporary directory where /dev/shm is missing or too small)
that the other process maps read-only (``open_shared``): copied into it (``SharedSlot.put``), or filled in place
(``SharedSlot.views``: extraction's device copies land there, so a shard crosses without a copy); none on the way
out, no pickling of arrays. ``SharedArrays`` is one such file for one hand-over (a sweep's splits), removed when
its ``with`` block ends, also on errors. ``HandoverSlots`` keeps files and reuses them, for a stream of hand-overs
(extraction's shards): a fresh file's pages are allocated and zeroed on first touch on both sides, which cost
more than the copy itself (dev box, ViT-B shards: 4.0 ms per image at 512 and 15.5 at 1024 to fill a fresh file,
0.8 and 2.2 to fill it again; the writer process's first reads another 0.4 and 1.7), so a slot is faulted in once
and a writer process maps each slot once (``write_shared_shard``).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import queue
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from fpt.store.writer import StoreWriter

# array name -> (offset in bytes, shape, dtype)
Spec = dict[str, tuple[int, tuple[int, ...], str]]
ALIGN = 64


def handover_spec_of(arrays: Mapping[str, np.ndarray]) -> tuple[Spec, int]:
    """``handover_spec`` of these arrays."""
    return handover_spec({name: (a.shape, a.dtype) for name, a in arrays.items()})


def handover_spec(shapes: Mapping[str, tuple[Sequence[int], np.dtype | str]]) -> tuple[Spec, int]:
    """Where arrays of these (shape, dtype) go in a hand-over file (64-byte aligned, in order) and the file's size;
    before they exist, to fill them in place (``SharedSlot.views``)."""
    spec: Spec = {}
    size = 0
    for name, (shape, dtype) in shapes.items():
        dtype = np.dtype(dtype)
        spec[name] = (size, tuple(shape), dtype.str)
        size += -(-_nbytes(shape, dtype) // ALIGN) * ALIGN
    return spec, size


def _nbytes(shape: Sequence[int], dtype: np.dtype | str) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


class SharedSlot:
    """A memory-mapped file of ``size`` bytes that other processes of this machine read: ``put(arrays)`` copies
    arrays into it and returns the ``(path, spec)`` that ``open_shared`` takes; it can be filled again once the
    reader is done. ``close`` removes the file."""

    def __init__(self, size: int):
        self.size = whole_pages(size)                                       # (e.g. to page-lock)
        self.path = new_shared_file(self.size)
        try:
            self._memory: np.memmap | None = np.memmap(self.path, np.uint8, "r+", shape=(self.size,))
        except BaseException:
            self.close()
            raise

    def put(self, arrays: Mapping[str, np.ndarray]) -> tuple[str, Spec]:
        spec = handover_spec_of(arrays)[0]
        for name, view in self.views(spec).items():
            np.copyto(view, arrays[name])
        return self.path, spec

    def views(self, spec: Spec) -> dict[str, np.ndarray]:
        """Writable arrays over this slot's memory where ``spec`` (``handover_spec``) puts them: filled in place,
        they are handed over as ``(slot.path, spec)`` with no copy."""
        if max((offset + _nbytes(shape, dtype) for offset, shape, dtype in spec.values()), default=0) > self.size:
            raise ValueError(f"the arrays do not fit a hand-over slot of {self.size} bytes")
        return {name: _view(self._memory, *s) for name, s in spec.items()}

    @property
    def memory(self) -> np.ndarray:
        """The whole mapping (uint8 [size]), e.g. to page-lock it for a device's copies."""
        return self._memory

    def close(self) -> None:
        self._memory = None
        Path(self.path).unlink(missing_ok=True)


class SharedArrays(SharedSlot):
    """``with SharedArrays(arrays) as (path, spec):`` the arrays copied into a slot of their size for one
    hand-over, removed when the block ends; ``open_shared(path, spec)`` gives them back in any process of this
    machine."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        super().__init__(handover_spec_of(arrays)[1])
        try:
            self.handle = self.put(arrays)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> tuple[str, Spec]:
        return self.handle

    def __exit__(self, *exc) -> None:
        self.close()


class HandoverSlots:
    """Hand-over files reused from one hand-over to the next (thread-safe). ``with slots.put(arrays) as (path,
    spec):`` fills a free slot and frees it when the block ends; ``take(size)`` lends a slot to fill in place
    (``SharedSlot.views``) until ``give(slot)``. A new slot is made when none is free (or the free one is too
    small: it is removed), so there are never more slots than hand-overs at once; ``prepare`` makes them ahead, on
    a thread of its own. ``close`` removes every file; ``before_close(slot)`` runs for each slot just before its
    file is unmapped and removed (e.g. to undo a page-lock)."""

    def __init__(self, before_close: Callable[[SharedSlot], None] | None = None):
        self._free: queue.SimpleQueue[SharedSlot] = queue.SimpleQueue()
        self._all: list[SharedSlot] = []
        self._lock = threading.Lock()
        self._before_close = before_close
        self._coming = 0                                # slots ``prepare`` has yet to hand out
        self._preparer: threading.Thread | None = None
        self._stop = threading.Event()

    def prepare(self, size: int, count: int, ready: Callable[[SharedSlot], object] | None = None) -> None:
        """Make ``count`` slots of ``size`` bytes on a background thread, each with its pages faulted in and then
        ``ready(slot)`` run on it (e.g. page-locking it), and hand them out (``take`` waits for one that is on its
        way rather than making another). A fresh file's pages are allocated and zeroed on first touch, which
        costs more than filling it (see the module's docstring): done here, that happens before the first
        hand-overs need the slots, not on the thread that fills them. A failure stops the preparation; ``take``
        then makes slots as usual."""
        with self._lock:
            self._coming = count

        def run() -> None:
            try:
                for _ in range(count):
                    if self._stop.is_set():
                        break
                    slot = SharedSlot(size)
                    with self._lock:
                        self._all.append(slot)
                    slot.memory[::mmap.PAGESIZE] = 0            # one write per page: allocated now
                    if ready:
                        ready(slot)
                    with self._lock:
                        self._coming -= 1
                        self._free.put(slot)
            except Exception:           # noqa: BLE001 - e.g. /dev/shm full: ``take`` meets it and reports it
                pass
            finally:
                with self._lock:
                    self._coming = 0
                    self._free.put(None)                        # wakes a ``take`` waiting for a slot that won't come

        self._preparer = threading.Thread(target=run, name="fpt-handover-prepare", daemon=True)
        self._preparer.start()

    @contextmanager
    def put(self, arrays: Mapping[str, np.ndarray]) -> Iterator[tuple[str, Spec]]:
        slot = self.take(handover_spec_of(arrays)[1])
        try:
            yield slot.put(arrays)
        finally:
            self.give(slot)

    def take(self, size: int) -> SharedSlot:
        """A slot of at least ``size`` bytes, the caller's until ``give``."""
        while True:         # a free slot, waiting for one that ``prepare`` has on its way
            try:
                slot = self._free.get(block=self._coming > 0)
            except queue.Empty:
                slot = None
                break
            if slot is not None:                        # (None: the end of a preparation; look again)
                break
        if slot is not None and slot.size < size:       # a bigger shard than before: its slot grows
            self._remove(slot)
            slot = None
        if slot is None:
            slot = SharedSlot(size)
            with self._lock:
                self._all.append(slot)
        return slot

    def give(self, slot: SharedSlot) -> None:
        self._free.put(slot)

    def _remove(self, slot: SharedSlot) -> None:
        with self._lock:
            self._all.remove(slot)
        self._close(slot)

    def close(self) -> None:
        """Stop any preparation (after its current slot) and remove every file."""
        self._stop.set()
        if self._preparer is not None:
            self._preparer.join()
        with self._lock:
            slots, self._all = self._all, []
        for slot in slots:
            self._close(slot)

    def _close(self, slot: SharedSlot) -> None:
        try:
            if self._before_close:
                self._before_close(slot)
        finally:
            slot.close()


class WorkerSlots:
    """Memory that helper processes fill and this process reads, reused from hand-over to hand-over: ``per_worker``
    slots of ``size`` bytes for each of ``workers`` processes (DataLoader workers: extraction's decoded batches,
    training's read windows), all in one file under /dev/shm that each process maps once.

    Why: a DataLoader worker otherwise sends each item in fresh shared memory, whose pages are allocated and
    zeroed on first touch in the worker and faulted in again by the reader (dev box, 2 decode workers, 1024 px
    RGB PNGs: 17.3-18.0 ms of a worker's CPU per image that way, 15.0-15.5 through these slots;
    ``python -m fpt.bench.loader_slots``). ``fpt.loader_slots`` puts torch tensors through them.

    Protocol, with no lock: worker ``w`` calls ``take(w)`` for a slot of its own (None when all of them are in
    use: the caller falls back to its usual path, so a miscount never blocks), fills ``view(i, nbytes)`` and sends
    the index; this process reads the same view and calls ``give(i)``. Only the owning worker marks a slot taken
    and only this process marks it free again, each with one byte store. A slot's pages are reserved
    (``posix_fallocate``) when its worker first takes it: a full /dev/shm is then an error it can fall back from,
    not a SIGBUS on writing through the map. ``close`` removes the file (a killed run's file goes with
    ``remove_stale``). Picklable (the path and the sizes), for DataLoaders that spawn their workers."""

    UNUSED, FREE, TAKEN, REFUSED = 0, 1, 2, 3          # a slot's state: its byte in the file's first page

    def __init__(self, workers: int, per_worker: int, size: int):
        self.workers, self.per_worker = workers, per_worker
        self.size = whole_pages(size)
        self.count = workers * per_worker
        self.header = whole_pages(self.count)
        # sparse: a slot's pages exist once its worker reserves them
        self.path = new_shared_file(self.header + self.count * self.size)
        self._owner = os.getpid()
        self._mapped: tuple[int, np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mapped": None}

    def _memory(self) -> np.memmap:
        if self._mapped is None or self._mapped[0] != os.getpid():     # once per process (a fork maps again)
            self._mapped = (os.getpid(), np.memmap(self.path, np.uint8, "r+"))
        return self._mapped[1]

    def take(self, worker: int) -> int | None:
        """A free slot of ``worker``'s, marked taken (its pages reserved on first use), or None."""
        memory = self._memory()
        for i in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            state = memory[i]
            if state == self.FREE or (state == self.UNUSED and self._reserve(i)):
                memory[i] = self.TAKEN
                return i
        return None

    def _reserve(self, i: int) -> bool:
        if not hasattr(os, "posix_fallocate"):     # (macOS) unreserved pages could SIGBUS: no slots
            self._memory()[i] = self.REFUSED
            return False
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, self.header + i * self.size, self.size)
            finally:
                os.close(fd)
            return True
        except OSError:                             # e.g. /dev/shm full: this slot is never used
            self._memory()[i] = self.REFUSED
            return False

    def view(self, i: int, nbytes: int) -> np.ndarray:
        """Slot ``i``'s first ``nbytes`` bytes (uint8), writable."""
        if nbytes > self.size:
            raise ValueError(f"{nbytes} bytes do not fit a slot of {self.size}")
        start = self.header + i * self.size
        return self._memory()[start:start + nbytes]

    def give(self, i: int) -> None:
        """Slot ``i`` free again (this process has read it)."""
        self._memory()[i] = self.FREE

    def close(self) -> None:
        self._mapped = None
        if os.getpid() == getattr(self, "_owner", os.getpid()):
            Path(self.path).unlink(missing_ok=True)


def whole_pages(size: int) -> int:
    """``size`` bytes rounded up to whole pages (at least one)."""
    return -(-max(size, 1) // mmap.PAGESIZE) * mmap.PAGESIZE


def new_shared_file(size: int) -> str:
    """The path of a new file of ``size`` bytes (sparse) in ``handover_folder``, named after this process so that
    ``remove_stale`` removes it once the process is gone."""
    remove_stale()
    fd, path = tempfile.mkstemp(prefix=f"fpt-shared-{os.getpid()}-", dir=handover_folder(size))
    try:
        os.ftruncate(fd, size)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return path


_cleaned: list[bool] = []


def remove_stale() -> None:
    """Once per process: remove the hand-over files of processes that no longer exist (killed with -9, their
    ``with`` block never ended), which would otherwise hold memory in /dev/shm until a reboot."""
    if _cleaned:
        return
    _cleaned.append(True)
    for folder in {"/dev/shm", tempfile.gettempdir()}:
        for path in Path(folder).glob("fpt-shared-*-*"):
            pid = path.name.split("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process
        return True
    return True


def handover_folder(size: int) -> str:
    """/dev/shm when it has room for ``size`` bytes (``shm_has_room``), else the temporary directory."""
    return "/dev/shm" if shm_has_room(size) else tempfile.gettempdir()


def shm_has_room(size: int) -> bool:
    """Whether /dev/shm has room for ``size`` bytes twice over (containers often give it only 64 MB, and writing
    past a full tmpfs through a memory map kills the process)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= 2 * size


def _view(memory: np.ndarray, offset: int, shape: Sequence[int], dtype: str) -> np.ndarray:
    dtype = np.dtype(dtype)
    return memory[offset:offset + _nbytes(shape, dtype)].view(dtype).reshape(tuple(shape))


def open_shared(path: str, spec: Spec, memory: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays of a hand-over file, read-only (``spec`` may have come through JSON: lists for tuples);
    ``memory``: the file already mapped."""
    memory = np.memmap(path, np.uint8, "r") if memory is None else memory
    return {name: _view(memory, *s) for name, s in spec.items()}


@functools.lru_cache(maxsize=64)
def _mapped(path: str, inode: int, size: int) -> np.memmap:
    # A writer process maps each slot once: mapping it again per shard would fault its pages in again. Keyed by
    # inode and size too, so a new file under a reused name is never read through an old mapping. Room for every
    # slot of an extraction (its writers, at most 16, + the shards one batch fills, a few).
    return np.memmap(path, np.uint8, "r")


@functools.lru_cache(maxsize=4)
def _writer(store: str, direct_io: bool) -> StoreWriter:
    return StoreWriter.reopen(store, direct_io)


def reuse_freed_memory() -> bool:
    """Make this process keep the memory it frees and reuse it, instead of returning it to the OS (glibc's
    malloc: blocks of up to 32 MB come from one heap, trimmed only when 1 GB of it is free).

    For a helper process that handles big buffers one after another: a writer process (shard after shard), a
    decode worker of extraction (image after image), a store reader of training (window after window). By
    default malloc maps many of those buffers fresh, and their pages fault in one by one. Dev box, ViT-B
    (bench/README.md, "The writer's memory, reused" and what follows it):
    - a zstd-1 write (Blosc's output, numcodecs' copy of it, zarr's copy with the checksum, per K and V chunk):
      ~780 faults per image at 512 and ~3,100 at 1024 before, none after; CPU per image 9.4-15.7 -> 9.0-11.2 ms
      at 512 and 47-69 -> 36-59 at 1024 (a noisy box);
    - a decode worker, 1024 px RGB PNGs at 1024: 3,491-3,726 faults per image -> 777-780 (the batch's shared
      memory), 24.9-25.3 -> 17.5-18.2 ms; 10-33 % less CPU wherever its buffers are megabytes;
    - a store reader, a window of 5 shards at 512: 528-732 faults per sample -> 0-1, 6.0-6.3 -> 3.8-4.4 ms.
    The price: the process's memory stays at its peak between buffers. Blocks over 32 MB are still mapped fresh
    (glibc's limit). False where malloc is not glibc's: nothing done."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8   # glibc's <malloc.h>
    return all(mallopt(option, value) for option, value in ((m_mmap_threshold, 32 << 20),
                                                            (m_trim_threshold, 1 << 30), (m_arena_max, 1)))


def lower_priority(niceness: int) -> None:
    """Lower this process's CPU priority by ``niceness`` (``os.nice``; 0: unchanged). For a helper process, at its
    start: Linux sets the priority of the calling thread, and the threads it starts later inherit it. Where the
    system refuses, nothing is done (only a matter of who gets a busy machine's cores first)."""
    if niceness > 0:
        try:
            os.nice(niceness)
        except OSError:
            pass


def start_helper(worker_id: int = 0, niceness: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (``niceness`` bound with ``functools.partial``) for helper processes that
    handle big buffers one after another (extraction's decode workers, image after image; training's store
    readers, window after window): ``lower_priority(niceness)``, then ``reuse_freed_memory``."""
    lower_priority(niceness)
    reuse_freed_memory()


def start_writer(store: str, direct_io: bool, niceness: int = 0) -> None:
    """A writer process's initializer: its priority lowered by ``niceness`` (``lower_priority``, first, so that
    zarr's event-loop thread inherits it), its memory reused from shard to shard (``reuse_freed_memory``), zarr
    imported and the store's arrays opened before its first shard arrives (~0.3 s of a fresh process on the dev
    box, otherwise paid by the first shard of each writer). A failure is left to that first write to report,
    with the write's own error."""
    lower_priority(niceness)
    reuse_freed_memory()
    try:
        _writer(store, direct_io).open_arrays()
    except Exception:           # noqa: BLE001 - only a head start (a failed open is not cached: tried again)
        pass


def write_shared_shard(store: str, direct_io: bool, shard: int, path: str, spec: Spec,
                       excluded: Sequence[int] = ()) -> None:
    """In a writer process: ``StoreWriter.write_shard`` of the arrays a hand-over file holds (the store opened
    as the run's StoreWriter opened it: ``direct_io``)."""
    stat = os.stat(path)
    arrays = open_shared(path, spec, _mapped(path, stat.st_ino, stat.st_size))
    _writer(store, direct_io).write_shard(shard, arrays, excluded)
