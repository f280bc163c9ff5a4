"""Arrays handed to other processes on this machine through one memory-mapped file (``SharedArrays``): a
shard's arrays to a writer process (``write_shared_shard``), a store split to the concurrent runs of a sweep.

Why processes: zarr runs every synchronous call of a process on one event-loop thread, and that thread does part
of each write itself (the bytes and checksum codecs, assembling the shard from its encoded chunks: memory copies
proportional to the data). Measured on the dev box, about 2 ms per MB of K/V: one core's worth, about 500 MB/s,
which is what ``fpt extract`` reached on an H100 machine (ViT-B: 111 images/s at 512, 33 at 1024, whatever the
number of writer threads). Each writer process has its own event loop, so writes scale with the cores.

Transport: ``SharedArrays`` copies the arrays into one file under /dev/shm (the temporary directory where
/dev/shm is missing or too small) and the other process maps it read-only (``open_shared``): one memory copy on
the way in, none on the way out, no pickling of arrays.
The file is removed when the ``with`` block ends, also on errors.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fpt.store.writer import StoreWriter

# array name -> (offset in bytes, shape, dtype)
Spec = dict[str, tuple[int, tuple[int, ...], str]]
ALIGN = 64


class SharedArrays:
    """``with SharedArrays(arrays) as (path, spec):`` the arrays copied into one memory-mapped file, removed when
    the block ends; ``open_shared(path, spec)`` gives them back in any process of this machine."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.spec: Spec = {}
        size = 0
        for name, a in arrays.items():
            self.spec[name] = (size, tuple(a.shape), a.dtype.str)
            size += -(-a.nbytes // ALIGN) * ALIGN
        remove_stale()
        fd, self.path = tempfile.mkstemp(prefix=f"fpt-shared-{os.getpid()}-", dir=handover_folder(size))
        try:
            os.ftruncate(fd, max(size, 1))
            memory = np.memmap(self.path, np.uint8, "r+", shape=(max(size, 1),))
            for name, a in arrays.items():
                np.copyto(_view(memory, *self.spec[name]), a)
            del memory
        except BaseException:
            self._remove()
            raise
        finally:
            os.close(fd)

    def __enter__(self) -> tuple[str, Spec]:
        return self.path, self.spec

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        Path(self.path).unlink(missing_ok=True)


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
    """/dev/shm when it has room for ``size`` bytes twice over (containers often give it only 64 MB, and writing
    past a full tmpfs through a memory map kills the process), else the temporary directory."""
    try:
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize >= 2 * size:
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


def _view(memory: np.ndarray, offset: int, shape: Sequence[int], dtype: str) -> np.ndarray:
    dtype = np.dtype(dtype)
    return memory[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(tuple(shape))


def open_shared(path: str, spec: Spec) -> dict[str, np.ndarray]:
    """The arrays of a ``SharedArrays`` file, read-only (``spec`` may have come through JSON: lists for tuples)."""
    memory = np.memmap(path, np.uint8, "r")
    return {name: _view(memory, *s) for name, s in spec.items()}


@functools.lru_cache(maxsize=4)
def _writer(store: str) -> StoreWriter:
    return StoreWriter.reopen(store)


def write_shared_shard(store: str, shard: int, path: str, spec: Spec, excluded: Sequence[int] = ()) -> None:
    """In a writer process: ``StoreWriter.write_shard`` of the arrays a ``SharedArrays`` file holds."""
    _writer(store).write_shard(shard, open_shared(path, spec), excluded)
