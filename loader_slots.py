"""Items from DataLoader worker processes to the main process, in shared memory reused from item to item.

A DataLoader worker sends each item in fresh shared memory by default: its pages are allocated and zeroed on first
touch in the worker, and faulted in again by the main process's pinning thread. Here each worker puts its item
(a tensor, or a dict of tensors) into one of its own ``WorkerSlots`` slots and sends only a ``SlotItem``; the
pinning thread copies it out into page-locked memory (``SlotItem.pin_memory``, which the DataLoader calls) and
frees the slot, or the consumer does (``received``) where nothing is pinned. A worker with no free slot, or an item
larger than a slot, goes the default way. A loader's slots live in one file under /dev/shm (``loader_slots``): two
per worker where the loader pins (its prefetch), so no more than the DataLoader itself would hold in flight.

Two users: extraction's decode workers (``stack_in_slot``: a batch of decoded images stacked straight into the
slot) and training's store readers (``fill_slot``: a window of shards decompressed straight into the slot).
Measured (dev box, 2 workers, ``python -m fpt.bench.loader_slots``, 2026-11-28): a decode worker's CPU per 1024 px
PNG 17.3-18.0 -> 15.0-15.5 ms (the kernel's part of it 2.9-3.1 -> 0.6-0.7); a store reader's per ViT-B/512 sample
9.0-13.5 -> 6.8-7.6 ms, and reading into the slot rather than copying a window there takes a window (256 MB) off
each reader's own memory; bench/README.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import get_worker_info

from fpt.store import WorkerSlots, handover_spec, shm_has_room

PREFETCH = 2                    # the DataLoader's prefetch_factor: a worker's items asked for at once
_OPEN: dict[str, WorkerSlots] = {}          # this process's slots by file path, which a SlotItem names


def slots_per_worker(pinned: bool) -> int:
    """A worker's slots: one per item it is asked for at once (``PREFETCH``; the DataLoader asks for the next one
    as it hands an item on), and one more where the consumer, not the pinning thread, frees a slot, which it does
    only after that."""
    return PREFETCH if pinned else PREFETCH + 1


@contextmanager
def loader_slots(workers: int, size: int, pinned: bool) -> Iterator[WorkerSlots | None]:
    """Slots of ``size`` bytes for ``workers`` DataLoader workers (``pinned``: the loader pins) for the ``with``
    block, removed after it; None without workers, where /dev/shm has no room for them or refuses the file (the
    DataLoader's default way then, which needs /dev/shm just as much)."""
    per_worker, slots = slots_per_worker(pinned), None
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


# where one tensor of an item sits in its slot: (name, or None for an item that is a lone tensor; byte offset;
# shape; dtype)
Place = tuple[str | None, int, tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class SlotItem:
    """An item that a worker put in slot ``index`` of the ``WorkerSlots`` at ``path``: what crosses to the main
    process instead of its bytes."""
    path: str
    index: int
    places: tuple[Place, ...]

    def take(self, pinned: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """The item copied out of its slot (into page-locked memory when ``pinned``); the slot is free again."""
        with self.borrowed() as item:
            views = item if isinstance(item, dict) else {None: item}
            out = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned).copy_(t) for name, t in views.items()}
        return out[None] if None in out else out

    @contextmanager
    def borrowed(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """The item where it lies in its slot, for the ``with`` block only: the slot is free again after it, for
        its worker to refill, so nothing of the item may be kept past the block (copy what is)."""
        slots = _OPEN.get(self.path)
        if slots is None:
            raise RuntimeError(f"an item in {self.path}, whose slots this process has closed")
        try:
            views = _slot_tensors(slots, self.index, self.places)
            yield views[None] if None in views else views
        finally:
            slots.give(self.index)

    def pin_memory(self, device=None) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the DataLoader's pinning thread calls on each item: ``take(pinned=True)``."""
        return self.take(pinned=True)


def received(item):
    """An item as the loader gave it, as tensors (pinned already when the loader pins)."""
    return item.take() if isinstance(item, SlotItem) else item


def stack_in_slot(slots: WorkerSlots | None, fallback: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                  tensors: Sequence[torch.Tensor]) -> torch.Tensor | SlotItem:
    """``torch.stack(tensors)`` into a free slot of this worker's, sent as a ``SlotItem``; ``fallback`` (the
    default way) outside a worker, without slots, with none free or when the stack does not fit."""
    shape = (len(tensors), *tensors[0].shape)
    item = fill_slot(slots, {None: (shape, tensors[0].dtype)},
                     lambda views: torch.stack(list(tensors), out=views[None]))
    return fallback(tensors) if item is None else item


def fill_slot(slots: WorkerSlots | None, shapes: Mapping[str | None, tuple[tuple[int, ...], torch.dtype]],
              fill: Callable[[dict[str | None, torch.Tensor]], object]) -> SlotItem | None:
    """A free slot of this worker's, laid out for ``shapes`` (name -> (shape, dtype); the name None for an item
    that is one tensor) and filled by ``fill(views)`` (name -> a tensor of that shape in the slot), sent as a
    ``SlotItem``; None outside a worker, without slots, with none free or when the item does not fit (the
    default way then). A ``fill`` that raises gives the slot back."""
    worker = get_worker_info()
    if slots is None or worker is None:
        return None
    spec, size = handover_spec({name: ((prod(shape) * dtype.itemsize,), "u1")
                                for name, (shape, dtype) in shapes.items()})
    index = slots.take(worker.id) if size <= slots.size else None
    if index is None:
        return None
    places = tuple((name, spec[name][0], shape, dtype) for name, (shape, dtype) in shapes.items())
    try:
        fill(_slot_tensors(slots, index, places))
    except BaseException:
        slots.give(index)                   # never sent: still this worker's to free
        raise
    return SlotItem(slots.path, index, places)


def _slot_tensors(slots: WorkerSlots, index: int, places: tuple[Place, ...]) -> dict[str | None, torch.Tensor]:
    memory = torch.from_numpy(slots.view(index, slots.size))
    return {name: memory[offset:offset + prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, offset, shape, dtype in places}
