"""Decoded batches from the decode workers to the main process, in shared memory reused from batch to batch.

A DataLoader worker sends each batch in fresh shared memory by default: its pages are allocated and zeroed on first
touch in the worker, and faulted in again by the main process's pinning thread. Here each worker stacks its batch
into one of its own ``WorkerSlots`` slots (``stack_in_slot``) and sends only a ``SlotBatch``; the pinning thread
copies it out into page-locked memory (``SlotBatch.pin_memory``, which the DataLoader calls) and frees the slot, or
the loop does (``received``) where nothing is pinned. A worker with no free slot, or a batch larger than a slot,
goes the default way. The slots of a run live in one file under /dev/shm (``decode_slots``): two per worker where
the loader pins (the DataLoader's default prefetch), each the size of a batch of 8-bit RGB images, so no more than
the DataLoader itself would hold in flight.

Measured (dev box, 2 workers, 1024 px RGB PNGs, ``python -m fpt.bench.decode_loader``, 2026-11-28): a worker's
CPU per image 16.8-17.3 -> 14.7-14.9 ms (the kernel's part of it 2.7-3.0 -> 0.6-0.7), the main process's a
little less too; bench/README.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import get_worker_info

from fpt.store import WorkerSlots, shm_has_room

PREFETCH = 2                    # the DataLoader's prefetch_factor: a worker's batches asked for at once
_OPEN: dict[str, WorkerSlots] = {}          # this process's slots by file path, which a SlotBatch names


def slots_per_worker(pinned: bool) -> int:
    """A worker's slots: one per batch it is asked for at once (``PREFETCH``; the DataLoader asks for the next
    one as it hands a batch on), and one more where the loop, not the pinning thread, frees a slot, which it does
    only after that."""
    return PREFETCH if pinned else PREFETCH + 1


def slot_bytes(batch_size: int, res: int) -> int:
    """A slot's size: a batch of 8-bit RGB images (grey, and 16-bit grey in half precision, fit too)."""
    return batch_size * res * res * 3


@contextmanager
def decode_slots(workers: int, batch_size: int, res: int, pinned: bool) -> Iterator[WorkerSlots | None]:
    """The slots of ``workers`` decode workers (``pinned``: the loader pins) for the ``with`` block, removed after
    it; None without workers or where /dev/shm has no room for them (the DataLoader's default way then, which needs
    it just as much)."""
    size, per_worker = slot_bytes(batch_size, res), slots_per_worker(pinned)
    slots = None
    if workers > 0 and shm_has_room(workers * per_worker * size):      # not a file on disk: the default way
        try:
            slots = WorkerSlots(workers, per_worker, size)
        except OSError:                             # only a saving: the DataLoader's way works without it
            pass
    if slots is None:
        yield None
        return
    _OPEN[slots.path] = slots
    try:
        yield slots
    finally:
        _OPEN.pop(slots.path, None)
        slots.close()


@dataclass(frozen=True)
class SlotBatch:
    """A batch [B, ...] that a decode worker stacked into slot ``index`` of the ``WorkerSlots`` at ``path``: what
    crosses to the main process instead of its pixels."""
    path: str
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def take(self, pinned: bool = False) -> torch.Tensor:
        """The batch copied out of its slot (into page-locked memory when ``pinned``); the slot is free again."""
        slots = _OPEN.get(self.path)
        if slots is None:
            raise RuntimeError(f"decoded batch in {self.path}, whose slots this process has closed")
        out = torch.empty(self.shape, dtype=self.dtype, pin_memory=pinned)
        out.copy_(_slot_tensor(slots, self.index, self.shape, self.dtype))
        slots.give(self.index)
        return out

    def pin_memory(self, device=None) -> torch.Tensor:
        """What the DataLoader's pinning thread calls on each item: ``take(pinned=True)``."""
        return self.take(pinned=True)


def received(batch: torch.Tensor | SlotBatch) -> torch.Tensor:
    """A batch as the loader gave it, as a tensor (pinned already when the loader pins)."""
    return batch.take() if isinstance(batch, SlotBatch) else batch


def stack_in_slot(slots: WorkerSlots | None, fallback: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                  tensors: Sequence[torch.Tensor]) -> torch.Tensor | SlotBatch:
    """``torch.stack(tensors)`` into a free slot of this decode worker's, sent as a ``SlotBatch``; ``fallback``
    (the default way) outside a worker, without slots, with none free or when the batch does not fit."""
    worker = get_worker_info()
    shape, dtype = (len(tensors), *tensors[0].shape), tensors[0].dtype
    nbytes = prod(shape) * dtype.itemsize
    index = slots.take(worker.id) if slots is not None and worker is not None and nbytes <= slots.size else None
    if index is None:
        return fallback(tensors)
    try:
        torch.stack(list(tensors), out=_slot_tensor(slots, index, shape, dtype))
    except BaseException:
        slots.give(index)                   # never sent: still this worker's to free
        raise
    return SlotBatch(slots.path, index, shape, dtype)


def _slot_tensor(slots: WorkerSlots, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(slots.view(index, prod(shape) * dtype.itemsize)).view(dtype).view(shape)
