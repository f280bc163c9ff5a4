"""Writing a store's big files past the page cache (O_DIRECT), where the filesystem allows it.

Why: on a GPU host the CPUs, not the GPU, limit extraction, and a buffered write of a new file is mostly the
kernel's work: page-cache pages allocated, filled and accounted, then written back by kernel threads. On the dev
box a ViT-B/1024 shard written with ``--codec none`` cost 33 ms of CPU per image, 29 of them in the kernel; with
O_DIRECT the device reads the bytes straight from the writer's buffer, and the same write took 9-10 ms
(bench/README.md, "Writes past the page cache").

What it costs: one copy into a page-aligned buffer (reused from write to write), and a write returns only when
the device has the data, so on a disk slower than the writers' output a run that the page cache would have
absorbed waits for the disk (``fpt extract --no-direct-io``). Files under ``DIRECT_MIN_BYTES`` (metadata, small
arrays), filesystems that refuse O_DIRECT (tmpfs before Linux 6.6, many FUSE mounts: EINVAL) and systems without
it (macOS, Windows) are written as zarr's LocalStore writes them. It relies on LocalStore's ``set`` signature and
its ``_open``/``_check_writable`` (zarr 3.1; tests/test_direct_io.py fails if they change).

Guarantees kept: every file appears whole or not at all (written under a temporary name, then renamed, as
LocalStore does), with the same bytes and the same permissions (umask); nothing is fsync'ed, as before.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import threading
import uuid
from pathlib import Path
from typing import Iterator

from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

DIRECT_MIN_BYTES = 1 << 20     # smaller files gain little CPU and would wait for the disk
ALIGNMENT = 4096               # O_DIRECT wants offsets, lengths and buffer addresses in logical blocks (512 or 4096)
AVAILABLE = hasattr(os, "O_DIRECT")


class DirectWriteStore(LocalStore):
    """zarr's LocalStore, writing values of ``DIRECT_MIN_BYTES`` or more with ``write_direct``; once the
    filesystem refuses O_DIRECT, every write goes the LocalStore's way."""

    direct = AVAILABLE

    async def set(self, key: str, value: Buffer) -> None:
        if not (self.direct and len(value) >= DIRECT_MIN_BYTES):
            return await super().set(key, value)
        if not self._is_open:
            await self._open()
        self._check_writable()
        if not await asyncio.to_thread(write_direct, self.root / key, value.as_buffer_like()):
            self.direct = False
            await super().set(key, value)


def write_direct(path: Path, data: memoryview) -> bool:
    """Write ``data`` as the whole file ``path`` with O_DIRECT, through a temporary name in the same folder.
    False, with nothing left behind, where the filesystem refuses O_DIRECT; other errors (a full disk, ...)
    raise, as a buffered write's would."""
    data = memoryview(data).cast("B")
    size = len(data)
    padded = max(-(-size // ALIGNMENT), 1) * ALIGNMENT       # at least one block: an empty map cannot be made
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    with _BUFFERS.take(padded) as buffer:
        buffer[:size] = data
        buffer[size:] = bytes(padded - size)        # the last block's tail: written, then cut off by ftruncate
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_DIRECT, 0o666)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        try:
            try:
                written = 0
                while written < padded:
                    written += os.write(fd, buffer[written:])
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            os.replace(partial, path)
        except BaseException as e:
            partial.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno == errno.EINVAL:
                return False
            raise
    return True


class _AlignedBuffers:
    """Page-aligned buffers (anonymous maps), reused from write to write so that their pages fault in once; one
    per write in flight (zarr writes from a pool of threads), the largest kept."""

    KEEP = 2

    def __init__(self):
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self, size: int) -> Iterator[memoryview]:
        with self._lock:
            fitting = [b for b in self._free if len(b) >= size]
            if fitting:
                self._free.remove(fitting[0])
        buffer = fitting[0] if fitting else mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        try:
            with memoryview(buffer) as whole, whole[:size] as view:
                yield view
        finally:
            with self._lock:
                self._free = sorted([*self._free, buffer], key=len, reverse=True)
                dropped, self._free = self._free[self.KEEP:], self._free[:self.KEEP]
            for b in dropped:
                b.close()

    def reset(self) -> None:
        """In a forked child: the parent's lock may have been held by a thread that the child does not have."""
        self._free, self._lock = [], threading.Lock()


_BUFFERS = _AlignedBuffers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_BUFFERS.reset)
