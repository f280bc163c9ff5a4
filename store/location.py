"""Where a store lives: a local path, or any URL fsspec can open (``s3://bucket/cmmd.zarr``, ``gs://...``,
``memory://...``). The rest of fpt.store reaches files only through a StoreLocation, so every feature (lock,
skipped report, verify, inspect) works the same on both.

Credentials and endpoints come from the filesystem's usual configuration (for S3: AWS_PROFILE,
AWS_ENDPOINT_URL, ... or an fsspec config file), never from fpt options.
"""
from __future__ import annotations

import os
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fpt import FptError
from fpt.store.direct_io import DirectWriteStore


def is_url(where: str | Path) -> bool:
    return isinstance(where, str) and ("://" in where or "::" in where)


class StoreLocation:
    """A store's root on some filesystem. ``local`` is its Path when the filesystem is the local one."""

    def __init__(self, where: str | Path | "StoreLocation"):
        text = where.url if isinstance(where, StoreLocation) else str(where)
        self.url = text.rstrip("/") or text
        self._fs, self._fs_pid = None, None
        if not is_url(text):
            self.local: Path | None = Path(text)
            self.root = self.local.absolute().as_posix()
            return
        self.root = self._connect()[1].rstrip("/")
        self.local = Path(self.root) if isinstance(self.fs, LocalFileSystem) else None

    def _connect(self) -> tuple[fsspec.AbstractFileSystem, str]:
        try:
            fs, root = fsspec.core.url_to_fs(self.url) if is_url(self.url) else (LocalFileSystem(), self.url)
        except (ImportError, ValueError) as e:
            raise FptError(f"{self.url}: cannot open this URL ({e})") from None
        self._fs, self._fs_pid = fs, os.getpid()
        return fs, root

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, opened anew in each process: object-store clients (s3fs, ...) are not fork-safe, and
        a location travels into DataLoader and dask worker processes."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._connect()
        return self._fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_fs_pid": None}

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"StoreLocation({self.url!r})"

    @property
    def shared_between_processes(self) -> bool:
        """Whether another process sees what this one writes (not so for ``memory://``: one per process)."""
        from fsspec.implementations.memory import MemoryFileSystem
        return not isinstance(self.fs, MemoryFileSystem)

    @property
    def name(self) -> str:
        """The last path component (``cmmd.zarr``)."""
        return self.root.rsplit("/", 1)[-1]

    def zarr_target(self, direct_io: bool = False) -> Path | str | DirectWriteStore:
        """What ``zarr.open_group`` takes for this location: a Path (LocalStore) or the URL (FsspecStore);
        ``direct_io``: a local store's big files written past the page cache (direct_io.py; for writing)."""
        if self.local is None:
            return self.url
        return DirectWriteStore(self.local) if direct_io else self.local

    def _path(self, relative: str = "") -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def exists(self, relative: str = "") -> bool:
        return self.fs.exists(self._path(relative))

    def is_file(self, relative: str) -> bool:
        """Whether ``relative`` is a file. Unlike fsspec's ``isfile``, an unreachable filesystem or missing
        credentials raise FptError instead of reading as "no such file"."""
        try:
            return self.fs.info(self._path(relative))["type"] == "file"
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001 - each filesystem has its own errors (denied, unreachable, ...)
            what = "cannot read" if self.local is not None else "cannot reach"
            raise FptError(f"{self.url}: {what} the store ({type(e).__name__}: {e})") from None

    def check_reachable(self) -> None:
        """Raise FptError now when the filesystem cannot be reached, before any work starts."""
        self.is_file("zarr.json")

    def size(self, relative: str = "") -> int:
        """Bytes of every file under ``relative`` (0 when there is nothing)."""
        path = self._path(relative)
        return int(self.fs.du(path, total=True)) if self.fs.exists(path) else 0

    def remove(self) -> None:
        """Delete the store (a directory tree, a prefix of objects, or a single file)."""
        self.fs.rm(self.root, recursive=self.fs.isdir(self.root))

    def move_to(self, other: "StoreLocation") -> None:
        """Move the store to ``other`` on the same filesystem (a rename where the filesystem has one; an object
        store copies and deletes)."""
        if self.local is not None:
            self.local.rename(other.local)
            return
        # its files named one by one (s3fs's recursive mv also copies the prefix itself, an object that does not
        # exist: NoSuchKey), in one call, which an async filesystem (s3fs, gcsfs) runs concurrently
        names = self.fs.find(self.root)
        self.fs.copy(names, [other.root + name[len(self.root):] for name in names])
        self.fs.rm(self.root, recursive=True)

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self._path(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write the whole file (object stores cannot append)."""
        if self.local is not None:
            Path(self._path(relative)).parent.mkdir(parents=True, exist_ok=True)
        self.fs.pipe_file(self._path(relative), data)

    def sibling(self, suffix: str) -> str:
        """The path (in ``fs``) beside the store with ``suffix`` appended to its name (``cmmd.zarr.lock``)."""
        return self.root + suffix

    def beside(self, suffix: str) -> "StoreLocation":
        """The location beside the store, on its filesystem, with ``suffix`` appended to its name
        (``s3://bucket/cmmd.zarr.replaced``; ``sibling`` is only a path, which names a local file)."""
        return StoreLocation(self.url + suffix)


def store_stem(where: str | Path | StoreLocation) -> str:
    """The store's name without ``.zarr`` (``s3://b/cmmd.zarr`` -> ``cmmd``), for default output names."""
    return str(where).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
