"""Shard files written past the page cache (fpt.store.direct_io): the same bytes and guarantees as zarr's own
writes, a clean fallback where O_DIRECT is refused, and the option wired through extraction's writers."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from fpt.extract import extract
from fpt.store import Geometry, StoreReader, StoreWriter, direct_io
from fpt.store.direct_io import DIRECT_MIN_BYTES, DirectWriteStore, write_direct
from tests.conftest import micro_config
from tests.helpers import ATTRS, shard_arrays

pytestmark = pytest.mark.skipif(not direct_io.AVAILABLE, reason="no O_DIRECT on this system")


def direct_refused(folder: Path) -> bool:
    """Whether the filesystem under ``folder`` refuses O_DIRECT (then the tests of its effects skip)."""
    return not write_direct(folder / "probe", memoryview(b"x"))


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore; Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        view = np.frombuffer(mapped, np.uint8)
        pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), pages) == 0
        del view
    return sum(p & 1 for p in pages)


def assert_store_falls_back_to_buffered_writes(path):
    """A DirectWriteStore whose direct writes are refused writes a chunk over the threshold the LocalStore's way,
    stops trying (``direct`` off) and reads back what was written."""
    import zarr

    store = DirectWriteStore(path)
    data = np.arange(DIRECT_MIN_BYTES, dtype=np.uint8)                    # one chunk over the threshold
    array = zarr.create_array(store, shape=data.shape, chunks=data.shape, dtype=data.dtype, compressors=None)
    array[:] = data
    assert not store.direct
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], data)


@pytest.mark.parametrize("size", [0, 1, 511, 4096, 4097, (1 << 20) + 3])
def test_write_direct_writes_exactly_the_bytes_with_the_permissions_of_a_buffered_write(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    assert write_direct(tmp_path / "d" / "file", memoryview(data))      # its folder made, as zarr's writes do
    (tmp_path / "buffered").write_bytes(data.tobytes())
    assert (tmp_path / "d" / "file").read_bytes() == data.tobytes()
    mode = [stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "d" / "file", tmp_path / "buffered")]
    assert mode[0] == mode[1]
    assert os.listdir(tmp_path / "d") == ["file"]                         # no temporary file left
    assert write_direct(tmp_path / "d" / "file", memoryview(data[::-1].copy()))   # replaces a file whole
    assert (tmp_path / "d" / "file").read_bytes() == data[::-1].tobytes()


def test_a_refused_o_direct_leaves_nothing_and_the_store_writes_as_zarr_does(tmp_path, monkeypatch):
    """Where the filesystem refuses O_DIRECT (EINVAL), write_direct leaves no file and says so, and the store
    writes that value and every later one the LocalStore's way."""

    real_open = os.open

    def refuse(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    assert not write_direct(tmp_path / "file", memoryview(b"x" * 10))
    assert not (tmp_path / "file").exists() and os.listdir(tmp_path) == []
    assert_store_falls_back_to_buffered_writes(tmp_path / "s.zarr")


def test_a_failed_direct_write_raises_and_keeps_the_file_it_was_to_replace(tmp_path, monkeypatch):
    """A full disk (or any error but a refusal) fails the write, as a buffered write would; the file already
    there is kept whole and no temporary file is left."""
    (tmp_path / "file").write_bytes(b"kept")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        write_direct(tmp_path / "file", memoryview(b"new" * 5000))
    assert (tmp_path / "file").read_bytes() == b"kept" and os.listdir(tmp_path) == ["file"]


BIG = Geometry(n_samples=6, layers=2, heads=4, k=480, head_dim=64, embed_dim=8, image_res=4, samples_per_shard=3)


def big_shard(shard: int) -> dict[str, np.ndarray]:
    """A shard of BIG: its K and V files over DIRECT_MIN_BYTES whatever the codec, its other files under it."""
    return shard_arrays(BIG.samples_per_shard, shard, BIG)


def write_big_store(path: Path, codec: str, direct: bool) -> StoreWriter:
    n = BIG.n_samples
    writer = StoreWriter.open(path, BIG, ATTRS, ids=np.array([f"s{i}" for i in range(n)], dtype=object),
                              labels=np.zeros(n, int), split=np.zeros(n, int), codec=codec, direct_io=direct)
    for shard in range(BIG.n_shards()):
        writer.write_shard(shard, big_shard(shard))
    return writer


@pytest.mark.parametrize("codec", ["zstd-1", "none"])
def test_a_store_written_past_the_page_cache_holds_the_bytes_of_one_written_through_it(tmp_path, monkeypatch, codec):
    """Every file of the store (but the group's zarr.json, which holds its creation time) is byte for byte the
    same; the K/V files, and only the files over the threshold, went through write_direct."""
    if direct_refused(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    written = []

    def spy(path, data):
        written.append(path.relative_to(tmp_path / "direct.zarr").as_posix())
        return write_direct(path, data)

    monkeypatch.setattr(direct_io, "write_direct", spy)
    write_big_store(tmp_path / "direct.zarr", codec, direct=True)
    assert sorted({p.split("/")[0] for p in written}) == ["keys", "values"]
    assert len(written) == 2 * BIG.n_shards()
    write_big_store(tmp_path / "buffered.zarr", codec, direct=False)
    assert len(written) == 2 * BIG.n_shards()                           # none more

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.relative_to(root).as_posix() != "zarr.json"}

    direct, buffered = files(tmp_path / "direct.zarr"), files(tmp_path / "buffered.zarr")
    assert direct.keys() == buffered.keys()
    assert [name for name in direct if direct[name] != buffered[name]] == []
    read = StoreReader(tmp_path / "direct.zarr").read(range(BIG.n_samples), ("keys", "values"))
    np.testing.assert_array_equal(read["keys"], np.concatenate([big_shard(s)["keys"] for s in range(2)]))


@pytest.mark.skipif(sys.platform != "linux", reason="mincore through the C library")
@pytest.mark.parametrize("direct", [True, False])
def test_extractions_writer_processes_write_past_the_page_cache_unless_told_not_to(tmp_path, image_folder, direct):
    """``direct_io`` reaches the writer processes: the big shard files of a run (the low-res images here, 8 of
    256 px per shard, 1.5 MB) are not in the page cache after a direct run and are after a buffered one; both
    stores read the same."""
    if direct_refused(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    out = tmp_path / "s.zarr"
    extract(micro_config(image_folder, out, image_res=256, samples_per_shard=8, writers="processes",
                         write_threads=2, direct_io=direct))
    shard_files = [p for p in (out / "images").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert shard_files and all(p.stat().st_size >= DIRECT_MIN_BYTES for p in shard_files)
    resident = [resident_pages(p) for p in shard_files]
    if direct:
        assert resident == [0] * len(shard_files), resident
    else:
        assert all(r > 0 for r in resident), resident
    reference = tmp_path / "ref.zarr"
    extract(micro_config(image_folder, reference, image_res=256, samples_per_shard=8, direct_io=not direct))
    a, b = StoreReader(out), StoreReader(reference)
    for name in ("keys", "values", "images"):
        np.testing.assert_array_equal(a.read(range(16), (name,))[name], b.read(range(16), (name,))[name])


def test_a_write_refused_after_the_open_is_a_refusal_too(tmp_path, monkeypatch):
    """Some filesystems take an O_DIRECT open and refuse the write itself (EINVAL: FUSE mounts, a logical block
    larger than ALIGNMENT): a refusal as at the open, so write_direct says so and leaves nothing (the file already
    there kept), and the store writes that value and every later one the LocalStore's way instead of failing."""

    (tmp_path / "file").write_bytes(b"kept")

    def refuse(fd, data):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "write", refuse)                  # only write_direct writes through os.write
    assert not write_direct(tmp_path / "file", memoryview(b"new" * 5000))
    assert (tmp_path / "file").read_bytes() == b"kept" and os.listdir(tmp_path) == ["file"]
    assert_store_falls_back_to_buffered_writes(tmp_path / "s.zarr")
