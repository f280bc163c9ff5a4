"""One extraction at a time per store: an advisory lock on ``<store>.lock`` that names its holder.

The lock is an ``flock`` on the file, so the kernel releases it when its holder dies, SIGKILL included: a stale
lock file from a dead process is simply taken over, with no pid guessing and no race between two takers.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from fpt import FptError


class StoreLock:
    """``with StoreLock(store_path):`` holds ``<store_path>.lock`` for the block or raises FptError naming
    the process (pid, host, start time) that holds it."""

    def __init__(self, store: str | Path):
        self.path = Path(str(store).rstrip("/") + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "StoreLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FptError(f"{str(self.path)[:-5]} is being extracted by pid {holder.get('pid', '?')} on "
                               f"{holder.get('host', '?')} since {holder.get('since', '?')}; wait for it to finish")
            if _same_file(fd, self.path):
                break
            os.close(fd)           # the previous holder removed the file between our open and our lock: retry
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}
