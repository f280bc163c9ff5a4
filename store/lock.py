"""One extraction at a time per store: a lock file ``<store>.lock`` beside the store that names its holder.

Local filesystems: an ``flock`` on the file, so the kernel releases it when its holder dies, SIGKILL included;
a stale lock file from a dead process is simply taken over, with no pid guessing and no race between two takers.

Object stores (s3://, gs://, ...) have no locks, so there the file is a *lease*: the holder rewrites it every
``HEARTBEAT_S`` seconds and a lease not renewed for ``LEASE_S`` seconds is stale and taken over. Two extractions
started within the same second could both win (object stores offer no atomic create through fsspec); starting
one extraction per store, as everyone does, is safe, and a dead holder never blocks the store for longer than
``LEASE_S``.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from fpt import FptError
from fpt.store.location import StoreLocation

LEASE_S = 120.0        # a lease not renewed for this long belongs to a dead holder
HEARTBEAT_S = 20.0     # how often a live holder renews its lease
SETTLE_S = 1.0         # after writing a lease, wait this long and re-read it to see whether a rival overwrote it


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _busy(store: str, holder: dict, note: str = "") -> FptError:
    return FptError(f"{store} is being extracted by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"since {holder.get('since', '?')}{note}; wait for it to finish")


class StoreLock:
    """``with StoreLock(store):`` holds ``<store>.lock`` for the block or raises FptError naming the process
    (pid, host, start time) that holds it. ``store`` is a local path or an fsspec URL."""

    def __init__(self, store: str | Path | StoreLocation):
        self.location = StoreLocation(store)
        self._held: _FileLock | _LeaseLock | None = None

    def __enter__(self) -> "StoreLock":
        lock = _FileLock(self.location) if self.location.local is not None else _LeaseLock(self.location)
        lock.acquire()
        self._held = lock
        return self

    def __exit__(self, *exc) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None


class _FileLock:
    def __init__(self, location: StoreLocation):
        self.store = str(location)
        self.path = Path(location.sibling(".lock"))
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise _busy(self.store, holder)
            if _same_file(fd, self.path):
                break
            os.close(fd)           # the previous holder removed the file between our open and our lock: retry
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class _LeaseLock:
    def __init__(self, location: StoreLocation):
        self.location, self.store, self.fs = location, str(location), location.fs
        self.path = location.sibling(".lock")
        self.record = {**_holder_record(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict:
        try:
            return _parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return {}

    def _write(self) -> None:
        self.fs.pipe_file(self.path, json.dumps({**self.record, "renewed": time.time()}).encode())

    def acquire(self) -> None:
        self.location.check_reachable()
        holder = self._read()
        age = time.time() - float(holder.get("renewed", 0))
        if holder and age < LEASE_S:
            raise _busy(self.store, holder, f" (lease renewed {age:.0f} s ago; if that process is dead, the lease "
                                            f"is taken over {LEASE_S - age:.0f} s from now)")
        self._write()                               # free, or a stale lease of a dead holder: take it
        time.sleep(SETTLE_S)
        holder = self._read()
        if holder.get("token") != self.record["token"]:
            raise _busy(self.store, holder)
        self._renewer = threading.Thread(target=self._renew, name="fpt-store-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self._read().get("token") != self.record["token"]:
                    return            # taken over after our renewals failed for LEASE_S: never overwrite it
                self._write()
            except Exception:         # a missed renewal is retried; the lease lasts several heartbeats
                pass

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._read().get("token") == self.record["token"]:
            self.fs.rm_file(self.path)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data.decode() or "{}")
    except ValueError:
        return {}
