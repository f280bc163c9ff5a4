"""The write side of extraction's pipeline: ``ShardBuffer`` (one shard's arrays, filled batch by batch from the
device, in a writer process's page-locked hand-over file on CUDA) and ``ShardWriterPool`` (writer threads, each
handing its shard to a writer process on CUDA, at most so many shards in flight)."""
from __future__ import annotations

import os
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from fpt import FptError
from fpt.forkserver import fork_server_context, starting
from fpt.extract.timing import LoopWaits, Progress, ShardClock
from fpt.store import (Geometry, HandoverSlots, SharedSlot, Spec, StoreWriter, handover_spec, start_writer,
                       write_shared_shard)


FINITE_ARRAYS = ("keys", "values", "cls")      # the LPM's features, checked finite before a shard is written


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """Whether every element of the fp16 tensor ``x`` is finite, as a 0-d bool on its device. An fp32 sum of fp16
    values (each at most 65504 in size) cannot overflow for any tensor that fits in memory, so it is finite exactly
    when no element is inf or NaN: one reduction, ~10x cheaper on a CPU than ``isfinite(x).all()``."""
    return torch.isfinite(x.sum(dtype=torch.float32))


class ShardBuffer:
    """One shard's sample arrays, filled batch by batch: host tensors (pinned on CUDA, so the device-to-host
    copies are asynchronous) in the store's shapes and dtypes. Whether every stored feature is finite is tracked
    on the device and read with the arrays: a backbone whose activations overflow the precision (or the fp16 of
    the store) is stopped before its shard is written.

    ``slot``: fill a hand-over slot in place (``(slot, spec)``, the arrays at ``spec``'s places: page-locked on
    CUDA), so that a writer process reads what the device copied there; else the buffer allocates its own.
    ``copy_stream`` (CUDA): the stream the device-to-host copies run on, so that they overlap the LPM's next
    batch on the copy engine instead of waiting in line on the LPM's stream."""

    def __init__(self, geometry: Geometry, shard: int, pinned: bool, slot: tuple[SharedSlot, Spec] | None = None,
                 copy_stream: torch.cuda.Stream | None = None):
        self.shard, self.rows, self.slot = shard, geometry.shard_range(shard), slot
        self.copy_stream = copy_stream
        if slot is None:
            self.arrays = {name: torch.empty(shape, dtype=getattr(torch, dtype), pin_memory=pinned)
                           for name, (shape, dtype) in geometry.shard_shapes(shard).items()}
        else:
            self.arrays = {name: torch.from_numpy(a) for name, a in slot[0].views(slot[1]).items()}
        self.excluded: list[int] = []
        # blocking: a writer thread waiting for this shard's copies sleeps (the default event makes it spin a core
        # for up to a batch's GPU time, CPU the decode workers and writer processes need)
        self.ready = torch.cuda.Event(blocking=True) if pinned else None
        self._finite: list[torch.Tensor] = []                     # one device bool per batch
        self.finite = torch.ones((), dtype=torch.bool, pin_memory=pinned)

    def add(self, indices: list[int], batch: dict[str, torch.Tensor]) -> None:
        """Copy one batch (device or host tensors, [b, ...] each) into its rows; asynchronous from CUDA."""
        rows = slice(indices[0] - self.rows.start, indices[-1] + 1 - self.rows.start)
        self._finite.append(torch.stack([all_finite(batch[n]) for n in FINITE_ARRAYS]).all())
        with self._copying(batch.values()):
            for name, target in self.arrays.items():
                target[rows].copy_(batch[name], non_blocking=True)

    def seal(self) -> None:
        """Mark the end of the copies into this shard (an event the writer thread waits for)."""
        if self._finite:
            finite = torch.stack(self._finite).all()
            with self._copying([finite]):
                self.finite.copy_(finite, non_blocking=True)
        if self.ready is not None:
            self.ready.record(self.copy_stream)

    @contextmanager
    def _copying(self, sources: Iterable[torch.Tensor]) -> Iterator[None]:
        """The block's copies of ``sources`` on the copy stream, after the work that made them on the current
        stream; the allocator keeps their memory until the copies are done."""
        if self.copy_stream is None:
            yield
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            yield
        for t in sources:
            t.record_stream(self.copy_stream)

    def copied(self) -> None:
        """Wait until the device's copies into this shard are done (sleeping; at once on a CPU)."""
        if self.ready is not None:
            self.ready.synchronize()

    def numpy(self) -> dict[str, np.ndarray]:
        """The arrays, once they can be written (``check_writable``)."""
        self.check_writable()
        return {name: t.numpy() for name, t in self.arrays.items()}

    def check_writable(self) -> None:
        """Wait for the device's copies, then refuse (FptError) a shard whose features are not finite."""
        self.copied()
        if not bool(self.finite):
            raise FptError(f"the LPM's output is not finite in shard {self.shard} (samples {self.rows.start}-"
                           f"{self.rows.stop - 1}): the backbone overflows its precision or the store's fp16; "
                           "re-run with --precision bf16 or fp32 and --overwrite (precision is part of the "
                           "store's identity)")


CUDA_HOST_REGISTER_PORTABLE = 1      # cudaHostRegisterPortable: page-locked for every CUDA context, not only one


def page_lock(memory: np.ndarray) -> bool:
    """Page-lock host ``memory`` for CUDA as pinned memory is (``cudaHostRegister``), so that device-to-host
    copies into it run asynchronously; False where the driver refuses. On a thread of its own: a failed call
    leaves its error as the CUDA runtime's last error of the calling thread, which torch would report at that
    thread's next kernel launch."""
    def register() -> bool:
        return int(torch.cuda.cudart().cudaHostRegister(memory.ctypes.data, memory.nbytes,
                                                        CUDA_HOST_REGISTER_PORTABLE)) == 0
    try:
        return _on_own_thread(register)
    except Exception:          # noqa: BLE001 - no CUDA runtime here: the caller keeps memory of its own
        return False


def page_unlock(memory: np.ndarray) -> None:
    """Undo ``page_lock`` (before the memory is unmapped). A failure is ignored: the lock ends with the process."""
    try:
        _on_own_thread(lambda: torch.cuda.cudart().cudaHostUnregister(memory.ctypes.data))
    except Exception:          # noqa: BLE001 - e.g. the device failed: the run's own error is the one to report
        pass


def _on_own_thread(fn: Callable[[], object]):
    with ThreadPoolExecutor(1, thread_name_prefix="fpt-page-lock") as thread:
        return thread.submit(fn).result()


class ShardWriterPool:
    """Writes sealed ShardBuffers on background threads, at most ``threads`` waiting at once (``submit`` blocks
    until one finishes), re-raising a writer's error in the caller. Leaving the ``with`` block waits for every
    submitted write, also when leaving on an error; a shard whose write failed stays not-done, so a re-run
    rewrites it.

    ``processes``: each thread hands its shard to one of ``threads`` writer processes (``fpt.store.shared``), so
    that zarr's per-process event loop is not the limit, through hand-over files reused from shard to shard
    (``HandoverSlots``: at most ``threads`` + the shards being filled at once, ``filling``). ``buffer`` puts each
    shard in one of them, so the device's copies land where the writer process reads (on CUDA the files are
    page-locked for that; where the driver refuses, shards get buffers of their own and are copied into a file at
    the hand-over, as with threads); otherwise the threads write in this process. ``niceness``: how much lower the
    writer processes set their CPU priority (``lower_priority``). ``pinned``: buffers in page-locked memory (CUDA).
    A writer process that dies (killed, or the fork server it comes from, e.g. on an unguarded script) fails the
    run with an FptError, never a wait: for that, fork this process's other helpers (the DataLoader's workers)
    before the pool starts its processes, since a fork while one starts holds a copy of the fork server's pipe,
    whose end then never comes."""

    def __init__(self, writer: StoreWriter, threads: int, progress: Progress | None, total: int,
                 processes: bool = False, waits: LoopWaits | None = None, pinned: bool = False,
                 clock: ShardClock | None = None, shards: int | None = None, filling: int = 1, niceness: int = 0):
        self.writer, self.threads, self.progress, self.total = writer, max(1, threads), progress, total
        self.waits = waits or LoopWaits()               # where the caller waited for a shard: device, writing
        self.clock = clock or ShardClock()              # when each shard's copies and write ended
        self.pinned = pinned
        # the device-to-host copies' stream (ShardBuffer); pinned means CUDA, which a test without it simulates
        self.copy_stream = torch.cuda.Stream() if pinned and torch.cuda.is_available() else None
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="fpt-shard-writer")
        # forked from a fork server, not spawned (``fpt.forkserver``: no new import of the program per process),
        # and not forked from here: this process holds CUDA and threads (zarr's loop, the DataLoader's pinning)
        self.processes = (ProcessPoolExecutor(self.threads, mp_context=fork_server_context([start_writer.__module__]),
                                              initializer=start_writer,
                                              initargs=(str(writer.location), writer.direct_io, niceness))
                          if processes else None)
        self.slots = HandoverSlots(before_close=self._unlock) if processes else None
        # every slot is of the largest shard's size (shard 0), so the slots never grow and are page-locked once
        self.slot_size = handover_spec(writer.geometry.shard_shapes(0))[1] if processes else 0
        self._locked: set[str] = set()                  # page-locked slots (their paths)
        self.lock_refused = False                       # the driver refused to page-lock a slot
        self.copy_at_handover = not processes           # shards in buffers of their own (see ``buffer``)
        self.pending: deque[tuple[Future, ShardBuffer]] = deque()
        self.written = 0
        # the writer processes start (``start_writer``) while the loop starts: on a thread of their own, since the
        # first of a program waits for its fork server to start and import what they need
        self._starter = threading.Thread(target=self._start_processes, name="fpt-writer-start", daemon=True)
        if processes:            # last (nothing can fail after it): every slot the run will use, made meanwhile too
            self._starter.start()
            count = min(self.threads + filling, shards or self.threads + filling)
            self.slots.prepare(self.slot_size, count, ready=self._prepare_slot)

    def _start_processes(self) -> None:
        try:
            with starting():
                for _ in range(self.threads):
                    self.processes.submit(os.getpid)
        except Exception:       # noqa: BLE001 - only a head start: the first shard's own submit meets the error
            pass

    def __enter__(self) -> "ShardWriterPool":
        return self

    def buffer(self, shard: int) -> ShardBuffer:
        """The buffer the device's output for ``shard`` goes to: in a hand-over slot with writer processes, else
        (or once page-locking was refused) memory of its own."""
        geometry = self.writer.geometry
        new = partial(ShardBuffer, geometry, shard, self.pinned, copy_stream=self.copy_stream)
        if self.copy_at_handover:
            return new()
        slot = self.slots.take(self.slot_size)
        if self.pinned and (self.lock_refused or not self._lock(slot)):
            self.slots.give(slot)
            self.copy_at_handover = True
            warnings.warn("the CUDA driver did not page-lock the hand-over files, so each shard is copied once more "
                          "on its way to a writer process (more host CPU and memory; extraction is otherwise "
                          "unchanged)", RuntimeWarning, stacklevel=2)
            return new()
        return new(slot=(slot, handover_spec(geometry.shard_shapes(shard))[0]))

    def _prepare_slot(self, slot: SharedSlot) -> None:
        if self.pinned and not self.lock_refused and not self._lock(slot):
            self.lock_refused = True                    # ``buffer`` says so, once, on the loop's thread

    def _lock(self, slot: SharedSlot) -> bool:
        if slot.path not in self._locked:
            if not page_lock(slot.memory):
                return False
            self._locked.add(slot.path)
        return True

    def _unlock(self, slot: SharedSlot) -> None:
        if slot.path in self._locked:
            self._locked.discard(slot.path)
            page_unlock(slot.memory)

    def submit(self, shard: ShardBuffer) -> None:
        shard.seal()
        while len(self.pending) >= self.threads:
            self._finish(*self.pending.popleft())
        self.pending.append((self.executor.submit(self._write, shard), shard))

    def _write(self, shard: ShardBuffer) -> int:
        shard.copied()
        self.clock.shard_copied()
        if self.processes is None:
            self.writer.write_shard(shard.shard, shard.numpy(), shard.excluded)
        elif shard.slot is not None:                    # filled in place: handed over as it is
            slot, spec = shard.slot
            try:
                shard.check_writable()
                self._write_in_process(shard, slot.path, spec)
            finally:
                self.slots.give(slot)
        else:
            with self.slots.put(shard.numpy()) as (path, spec):
                self._write_in_process(shard, path, spec)
        self.clock.shard_written(len(shard.rows))
        return len(shard.rows)

    def _write_in_process(self, shard: ShardBuffer, path: str, spec: Spec) -> None:
        try:
            self.processes.submit(write_shared_shard, str(self.writer.location), self.writer.direct_io, shard.shard,
                                  path, spec, shard.excluded).result()
        except (BrokenProcessPool, EOFError, ConnectionError) as e:   # a writer, or their fork server, died
            raise FptError(f"a writer process ended before shard {shard.shard} was written ({type(e).__name__}: "
                           f"{e}); the shards written before it are kept: re-run the same command to resume. From "
                           "a script of your own, call fpt under `if __name__ == \"__main__\":` (the writer "
                           "processes import the script's main module, as multiprocessing's do)") from None

    def _finish(self, future: Future, shard: ShardBuffer) -> None:
        """Wait for a submitted shard: for its copies from the device (``waits.device``: a run whose GPU is the
        slower side waits there), then for its write (``waits.writing``)."""
        with self.waits.waiting("device"):
            shard.copied()
        with self.waits.waiting("writing"):
            self.written += future.result()
        if self.progress:
            self.progress(self.written, self.total)

    def __exit__(self, exc_type, exc, tb) -> None:
        # Shards already computed are written even when the loop failed (a bad image, an interrupt): they are
        # whole and correct, and the re-run then has less to do. Only the first error is raised.
        try:
            while self.pending:                               # the last shards: the run's tail
                future, shard = self.pending.popleft()
                if exc_type is None:
                    self._finish(future, shard)
                else:
                    future.exception()
            self.waits.mark("shards_written")
        finally:
            self.executor.shutdown(wait=True)
            if self.processes is not None:
                self._starter.join()
                try:
                    self.processes.shutdown(wait=True)
                    self.waits.mark("writer_processes_stopped")
                finally:
                    self._close_slots(failing=exc_type is not None)

    def _close_slots(self, failing: bool) -> None:
        """Remove the hand-over files, page-locked ones unlocked first. A shard that an error left unfinished may
        still be receiving the device's copies, so those end first; a device that fails there is reported only
        when nothing else failed before."""
        try:
            if self._locked:
                torch.cuda.synchronize()
        except Exception:               # noqa: BLE001 - the loop's own error comes first
            if not failing:
                raise
        finally:
            self.slots.close()
