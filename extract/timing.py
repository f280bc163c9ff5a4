"""Where an extraction's time goes: ``LoopWaits`` (what the loop's thread waited for) and ``ShardClock`` (when each
shard's copies from the device and its write ended: the start, the steady rate and the end of a run)."""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

Progress = Callable[[int, int], None]          # progress(samples done, samples in the run)


class LoopWaits:
    """Where the extraction loop's thread waited, in seconds: for its next decoded batch (``decoding``: the decode
    workers, or the decoding itself without workers), for the device (``device``: to catch up with the batches
    issued, ``DeviceLead``, or to finish a submitted shard's copies) and for a shard's write (``writing``:
    compressing and writing) before it could hand out another. The rest of its time it issued work to the
    device."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now, self.decoding, self.device, self.writing = now, 0.0, 0.0, 0.0
        self.first_batch: float | None = None          # when the first item arrived (``now``'s clock)
        self.warm_up: float | None = None              # seconds of the LPM's warm-up step, where there was one
        self.moments: dict[str, float] = {}            # when the run's start and end stages ended (``mark``)

    def mark(self, moment: str) -> None:
        """Record that ``moment`` (a stage of the run's start or end, e.g. ``decode_workers_forked``) is now."""
        self.moments[moment] = self.now()

    def batches(self, loader) -> Iterator:
        """``loader``'s items (a loader or its iterator, already started), the wait for each (and for the end)
        added to ``decoding``."""
        items = iter(loader)
        while True:
            with self.waiting("decoding"):
                item = next(items, _END)
            if item is _END:
                return
            if self.first_batch is None:
                self.first_batch = self.now()
            yield item

    @contextmanager
    def waiting(self, stage: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + self.now() - start)


_END = object()


class DeviceLead:
    """Keeps the loop at most ``batches`` batches ahead of the device: ``issued()`` after each batch records an
    event (``event()``, a blocking CUDA event), and once more than ``batches`` are in flight waits for the oldest,
    asleep, in ``waits.device``. Unchecked, the loop runs ahead until the driver's launch queue is full and then
    waits inside a kernel launch, which CUDA's default scheduling does by spinning a core on a host with more
    cores than GPUs, a core the decode workers and writers need. ``event`` None (a CPU): nothing to wait for."""

    def __init__(self, waits: LoopWaits, event: Callable[[], object] | None, batches: int = 2):
        self.waits, self.event, self.batches = waits, event, batches
        self.in_flight: deque = deque()

    def issued(self) -> None:
        if self.event is None:
            return
        done = self.event()
        done.record()
        self.in_flight.append(done)
        if len(self.in_flight) > self.batches:
            with self.waits.waiting("device"):
                self.in_flight.popleft().synchronize()


class ShardClock:
    """When the run's shards were written: ``shard_written(n)`` as each shard's write ends (from any thread: the
    writer threads call it, so the times are the writes' own, not when the loop next looked), ``shard_copied()``
    as a shard's copies from the device are done (the first one is kept: the start's model part)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now, self.marks, self.first_copied = now, [], None
        self._lock, self._done = threading.Lock(), 0

    def shard_written(self, n: int) -> None:
        with self._lock:
            self._done += n
            self.marks.append((self.now(), self._done))

    def shard_copied(self) -> None:
        with self._lock:
            if self.first_copied is None:
                self.first_copied = self.now()

    def first_shard_seconds(self, start: float) -> float | None:
        """From ``start`` to the first written shard (None: none written)."""
        return self.marks[0][0] - start if self.marks else None

    def last_shard_seconds(self, start: float) -> float | None:
        """From ``start`` to the last written shard (None: none written)."""
        return self.marks[-1][0] - start if self.marks else None

    def first_copied_seconds(self, start: float) -> float | None:
        """From ``start`` to the end of the first shard's copies from the device (None: none)."""
        return self.first_copied - start if self.first_copied is not None else None

    def steady_images_per_s(self) -> float | None:
        """Samples written after the first shard, per second since it (None: fewer than 3 shards)."""
        if len(self.marks) < 3:
            return None
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None
