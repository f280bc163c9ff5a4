"""The pipelined extraction loop: batches per shard, shard buffers, concurrent shard writers (threads and
writer processes)."""
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fpt import FptError
from fpt.extract import extract
from fpt.extract.run import shard_batches, shards_filling
from fpt.extract.shard_writing import ShardBuffer, all_finite
from fpt.store import SAMPLE_ARRAYS, Geometry, StoreReader, StoreWriter
from tests.conftest import micro_config
from tests.helpers import GEOM, assert_same_store, open_writer, shard_arrays


def test_batches_cover_every_shard_in_order_at_the_batch_size_across_shard_ends():
    g = Geometry(n_samples=23, layers=1, heads=1, k=1, head_dim=1, embed_dim=1, image_res=1, samples_per_shard=5)
    batches = shard_batches(g, [0, 2, 4], batch_size=3)
    assert [i for b in batches for p in b for i in p.indices] == [*range(0, 5), *range(10, 15), *range(20, 23)]
    assert [sum(len(p.indices) for p in b) for b in batches] == [3, 3, 3, 3, 1]
    assert [[(p.shard, p.indices, p.last_of_shard) for p in b] for b in batches] == [
        [(0, [0, 1, 2], False)], [(0, [3, 4], True), (2, [10], False)], [(2, [11, 12, 13], False)],
        [(2, [14], True), (4, [20, 21], False)], [(4, [22], True)]]
    wide = shard_batches(g, [0, 1, 2], batch_size=12)          # a batch wider than a shard covers several
    assert [[p.shard for p in b] for b in wide] == [[0, 1, 2], [2]]
    assert max(len(b) for b in shard_batches(g, [0, 1, 2, 3, 4], 12)) <= shards_filling(12, 5) == 4


def test_shard_buffer_assembles_batches_in_store_dtypes():
    g = Geometry(n_samples=10, layers=2, heads=3, k=4, head_dim=5, embed_dim=6, image_res=7, samples_per_shard=5)
    buf = ShardBuffer(g, 1, pinned=False)
    parts = [{"keys": torch.randn(n, 2, 3, 4, 5), "values": torch.randn(n, 2, 3, 4, 5),
              "indices": torch.randint(0, 9, (n, 2, 3, 4)), "cls": torch.randn(n, 6),
              "images": torch.randint(0, 255, (n, 7, 7, 3), dtype=torch.uint8)} for n in (3, 2)]
    buf.add([5, 6, 7], parts[0])
    buf.add([8, 9], parts[1])
    out = buf.numpy()
    assert out["keys"].dtype == np.float16 and out["indices"].dtype == np.int32 and out["images"].dtype == np.uint8
    for name in out:
        expected = torch.cat([p[name] for p in parts]).numpy().astype(out[name].dtype)
        np.testing.assert_array_equal(out[name], expected, err_msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_shards_copies_run_on_the_copy_stream_and_keep_their_sources_alive():
    """The device-to-host copies run on a stream of their own (overlapping the LPM's next batch): held back there
    behind a long kernel while the batch's tensors are freed and their memory filled again on the LPM's stream,
    the shard still receives the batch's values (the allocator keeps the sources until the copies are done)."""
    g = Geometry(n_samples=8, layers=2, heads=3, k=4, head_dim=5, embed_dim=6, image_res=7, samples_per_shard=8)
    copy_stream = torch.cuda.Stream()
    buf = ShardBuffer(g, 0, pinned=True, copy_stream=copy_stream)
    expected = []
    for rows in ([0, 1, 2], [3, 4, 5, 6, 7]):
        n = len(rows)
        batch = {"keys": torch.randn(n, 2, 3, 4, 5), "values": torch.randn(n, 2, 3, 4, 5),
                 "indices": torch.randint(0, 9, (n, 2, 3, 4)), "cls": torch.randn(n, 6),
                 "images": torch.randint(0, 255, (n, 7, 7, 3), dtype=torch.uint8)}
        expected.append(batch)
        on_device = {k: v.cuda() for k, v in batch.items()}
        with torch.cuda.stream(copy_stream):
            torch.cuda._sleep(int(5e8))                     # the copies wait behind this (~0.25 s)
        buf.add(rows, on_device)
        del on_device
        overwrite = [torch.full((n * 2 * 3 * 4 * 5,), 7.0, device="cuda") for _ in range(4)]    # reuses freed blocks
        del overwrite
    buf.seal()
    out = buf.numpy()
    for name in out:
        want = torch.cat([b[name] for b in expected]).numpy().astype(out[name].dtype)
        np.testing.assert_array_equal(out[name], want, err_msg=name)


def test_concurrent_shard_writers_give_the_serial_store(tmp_path, image_folder):
    serial, parallel = tmp_path / "serial.zarr", tmp_path / "parallel.zarr"
    extract(micro_config(image_folder, serial, samples_per_shard=2, write_threads=1))
    result = extract(micro_config(image_folder, parallel, samples_per_shard=2, write_threads=3, batch_size=1))
    assert result.n_written == 16
    assert_same_store(serial, parallel)
    run = StoreReader(parallel).attrs["last_run"]
    shard_mb = 2 * StoreReader(parallel).geometry.bytes_per_sample() / 2**20
    # one image per batch: one shard filled at a time, and a batch never covers two
    assert run["write_threads"] == 3 and run["host_buffer_limit_mb"] == round((3 + 2) * shard_mb, 1)


def test_a_failed_shard_write_keeps_the_others_and_resumes(tmp_path, image_folder, monkeypatch):
    reference, store = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    extract(micro_config(image_folder, reference, samples_per_shard=2))
    real_write = StoreWriter.write_shard

    def failing(self, shard, arrays, excluded=()):
        if shard == 3:
            raise OSError("simulated write failure")
        real_write(self, shard, arrays, excluded)

    monkeypatch.setattr(StoreWriter, "write_shard", failing)
    with pytest.raises(OSError, match="simulated"):
        extract(micro_config(image_folder, store, samples_per_shard=2, write_threads=2))
    done = StoreReader(store).done()
    assert done[:6].all() and not done[6:8].any()       # shards 0-2 written whole, shard 3 not
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    assert extract(micro_config(image_folder, store, samples_per_shard=2)).n_written == 16 - done.sum()
    assert_same_store(reference, store)


def test_one_extraction_builds_the_lpm_once(tmp_path, image_folder, monkeypatch):
    from fpt.extract import run

    built = []
    real = run.create_backbone
    monkeypatch.setattr(run, "create_backbone", lambda *a, **k: built.append(a) or real(*a, **k))
    monkeypatch.setattr(run, "_LPM", {})
    extract(micro_config(image_folder, tmp_path / "s.zarr"))
    assert len(built) == 1          # not again for the shard loop, which sees the resolved layers


def shared_files() -> set[str]:
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return {p.name for p in folder.glob("fpt-shared-*")}


def test_writer_processes_give_the_serial_store(tmp_path, image_folder, monkeypatch):
    """Each shard is filled in its hand-over file, which the writer process reads: nothing is copied at the
    hand-over, at most one file per writer plus the shard being filled, the serial store's bytes."""
    from fpt.store import shared

    def no_copy(self, arrays):
        raise AssertionError("a shard was copied into its hand-over file")

    taken, real_take = set(), shared.HandoverSlots.take

    def take(self, size):
        slot = real_take(self, size)
        taken.add(slot.path)
        return slot

    before = shared_files()
    serial, parallel = tmp_path / "serial.zarr", tmp_path / "parallel.zarr"
    extract(micro_config(image_folder, serial, samples_per_shard=2, write_threads=1))
    monkeypatch.setattr(shared.SharedSlot, "put", no_copy)
    monkeypatch.setattr(shared.HandoverSlots, "take", take)
    result = extract(micro_config(image_folder, parallel, samples_per_shard=2, write_threads=2, writers="processes"))
    assert result.n_written == 16
    assert_same_store(serial, parallel)
    filling = shards_filling(3, 2)                         # batches of 3 cover up to 3 shards of 2
    assert filling == 3 and 1 <= len(taken) <= 2 + filling
    run = StoreReader(parallel).attrs["last_run"]
    shard_mb = 2 * StoreReader(parallel).geometry.bytes_per_sample() / 2**20
    assert run["writers"] == "processes" and run["host_buffer_limit_mb"] == round((2 + filling) * shard_mb, 1)
    assert shared_files() == before                        # every hand-over file removed


def test_where_the_driver_refuses_to_page_lock_shards_are_copied_at_the_hand_over(tmp_path, monkeypatch):
    """On CUDA the hand-over files are page-locked so the device copies into them asynchronously; where that is
    refused (one warning), each shard gets memory of its own and is copied into a file when handed over."""
    from fpt.extract import shard_writing

    class Unpinned(shard_writing.ShardBuffer):     # this machine has no CUDA to pin memory with
        def __init__(self, geometry, shard, pinned, slot=None, copy_stream=None):
            super().__init__(geometry, shard, False, slot, copy_stream)

    locked = []
    monkeypatch.setattr(shard_writing, "ShardBuffer", Unpinned)
    monkeypatch.setattr(shard_writing, "page_lock", lambda memory: locked.append(memory.nbytes) or False)
    writer = open_writer(tmp_path / "s.zarr")
    arrays = {s: shard_arrays(len(GEOM.shard_range(s)), seed=s) for s in range(GEOM.n_shards())}
    before = shared_files()
    with shard_writing.ShardWriterPool(writer, 2, None, GEOM.n_samples, processes=True, pinned=True) as pool:
        for s in range(GEOM.n_shards()):
            if s == 0:
                with pytest.warns(RuntimeWarning, match="did not page-lock"):
                    buffer = pool.buffer(s)
            else:
                buffer = pool.buffer(s)
            assert buffer.slot is None
            buffer.add(list(GEOM.shard_range(s)), {k: torch.from_numpy(v) for k, v in arrays[s].items()})
            pool.submit(buffer)
    assert len(locked) == 1 and pool.copy_at_handover
    read = StoreReader(tmp_path / "s.zarr").read(range(GEOM.n_samples), ("keys", "images"))
    for name in ("keys", "images"):
        np.testing.assert_array_equal(read[name], np.concatenate([arrays[s][name] for s in arrays]), err_msg=name)
    assert shared_files() == before


def test_page_locked_hand_over_files_are_unlocked_after_the_device_and_before_they_are_removed(tmp_path,
                                                                                                 monkeypatch):
    """With the files page-locked (pretended here), shards are filled in place, each slot is locked once, and at
    the end the device's copies are waited for, then every file is unlocked while it still exists, then removed."""
    from fpt.extract import shard_writing

    class Unpinned(shard_writing.ShardBuffer):     # this machine has no CUDA to pin memory with
        def __init__(self, geometry, shard, pinned, slot=None, copy_stream=None):
            super().__init__(geometry, shard, False, slot, copy_stream)

    events = []
    monkeypatch.setattr(shard_writing, "ShardBuffer", Unpinned)
    monkeypatch.setattr(shard_writing, "page_lock", lambda memory: events.append("lock") or True)
    monkeypatch.setattr(shard_writing, "page_unlock", lambda memory: events.append("unlock"))
    monkeypatch.setattr(shard_writing.torch.cuda, "synchronize", lambda: events.append("synchronize"))
    writer = open_writer(tmp_path / "s.zarr")
    arrays = {s: shard_arrays(len(GEOM.shard_range(s)), seed=s) for s in range(GEOM.n_shards())}
    before = shared_files()
    real_close = shard_writing.SharedSlot.close

    def close(slot):
        events.append(("exists at close", Path(slot.path).exists()))
        real_close(slot)

    monkeypatch.setattr(shard_writing.SharedSlot, "close", close)
    with shard_writing.ShardWriterPool(writer, 1, None, GEOM.n_samples, processes=True, pinned=True) as pool:
        for s in range(GEOM.n_shards()):
            buffer = pool.buffer(s)
            assert buffer.slot is not None
            buffer.add(list(GEOM.shard_range(s)), {k: torch.from_numpy(v) for k, v in arrays[s].items()})
            pool.submit(buffer)
    slots = events.count("lock")
    assert 1 <= slots <= 2 and events.count("unlock") == slots
    assert events[slots] == "synchronize" and events[slots + 1::2] == ["unlock"] * slots
    assert events[slots + 2::2] == [("exists at close", True)] * slots
    read = StoreReader(tmp_path / "s.zarr").read(range(GEOM.n_samples), ("keys",))["keys"]
    np.testing.assert_array_equal(read, np.concatenate([arrays[s]["keys"] for s in arrays]))
    assert shared_files() == before


def test_page_lock_says_no_without_a_cuda_device_and_leaves_the_caller_able_to_go_on():
    from fpt.extract.shard_writing import page_lock

    memory = np.zeros(1 << 16, np.uint8)
    if torch.cuda.is_available():
        pytest.skip("checks the refusal; the CUDA test of the hand-over files checks the lock")
    assert page_lock(memory) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_device_copies_into_page_locked_hand_over_files(tmp_path, image_folder, monkeypatch):
    """The shard buffers of writer processes are their page-locked hand-over files (no copy on the way, no
    warning), and the store is the one writer threads make from the same device."""
    import warnings

    from fpt.extract import shard_writing

    seen, real_init = [], shard_writing.ShardBuffer.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((self.slot is not None, all(t.is_pinned() for t in self.arrays.values())))

    monkeypatch.setattr(shard_writing.ShardBuffer, "__init__", spy)
    options = dict(device="cuda", samples_per_shard=2, write_threads=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extract(micro_config(image_folder, tmp_path / "p.zarr", writers="processes", **options))
    assert not [w for w in caught if "page-lock" in str(w.message)]
    assert seen and set(seen) == {(True, True)}
    extract(micro_config(image_folder, tmp_path / "t.zarr", writers="threads", **options))
    assert_same_store(tmp_path / "t.zarr", tmp_path / "p.zarr")


class WrongShapeShard:
    """Stands in for a ShardBuffer whose keys have the wrong shape: its write fails in the writer process."""

    slot = None

    def __init__(self, shard, arrays):
        self.shard, self.rows, self.excluded, self.arrays = shard, GEOM.shard_range(shard), [], arrays

    def seal(self):
        pass

    def copied(self):
        pass

    def numpy(self):
        return self.arrays


def test_a_write_failing_in_a_writer_process_is_raised_and_the_other_shards_are_kept(tmp_path):
    from fpt.extract.shard_writing import ShardWriterPool

    before = shared_files()
    writer = open_writer(tmp_path / "s.zarr")
    good = shard_arrays(3, seed=0)
    bad = {**shard_arrays(3, seed=1), "keys": np.zeros((3, 1), np.float16)}
    with pytest.raises(ValueError, match="keys: shard 1 expects shape"):
        with ShardWriterPool(writer, 2, None, 6, processes=True) as pool:
            pool.submit(WrongShapeShard(0, good))
            pool.submit(WrongShapeShard(1, bad))
    done = StoreReader(tmp_path / "s.zarr").done()
    assert done[:3].all() and not done[3:].any()
    np.testing.assert_array_equal(StoreReader(tmp_path / "s.zarr").read(range(3), ("keys",))["keys"], good["keys"])
    assert shared_files() == before


def test_a_non_finite_lpm_output_stops_before_its_shard_and_keeps_the_others(tmp_path, image_folder, monkeypatch):
    """fp16 overflow (or a backbone producing inf): the shard is not written, the error says what to do."""
    from fpt import FptError
    from fpt.extract import run

    real = run.encode_batch
    calls = []

    def overflowing(lpm, high, mean, std, precision):
        out = real(lpm, high, mean, std, precision)
        calls.append(1)
        if len(calls) == 3:                                    # batch 3 = the first of shard 1 (batch 2, shard 4)
            out["values"][0, 0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(run, "encode_batch", overflowing)
    store = tmp_path / "s.zarr"
    with pytest.raises(FptError, match=r"not finite in shard 1 .*--precision bf16 or fp32 and --overwrite"):
        extract(micro_config(image_folder, store, samples_per_shard=4, batch_size=2))
    done = StoreReader(store).done()
    assert done[:4].all() and not done[4:8].any()


@pytest.mark.parametrize("precision, device, dtype", [
    ("auto", "cuda", torch.float16), ("fp16", "cuda", torch.float16), ("bf16", "cuda", torch.float16),
    ("fp32", "cuda", torch.float32), ("auto", "cpu", torch.float32), ("bf16", "cpu", torch.float32)])
def test_pixels_travel_in_half_precision_only_to_a_half_precision_lpm_on_cuda(precision, device, dtype):
    from fpt.extract.encode import pixel_dtype

    assert pixel_dtype(precision, torch.device(device)) == dtype


def test_pixels_travel_as_the_source_has_them_and_encode_to_the_same_features():
    """An 8-bit source's LPM input stays uint8 and a grey one stays one channel through the workers; a batch
    mixing kinds becomes RGB and the float dtype, exactly. The LPM's outputs from a uint8 grey batch equal those
    from the same pixels as float RGB."""
    from PIL import Image

    from fpt.extract import FrozenLPM, create_backbone, encode_batch, prepare_image
    from fpt.extract.images import grey_float
    from fpt.extract.run import DecodedImages
    from tests.conftest import MICRO

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8))
    sixteen = grey_float(rng.integers(0, 4096, (40, 40)).astype(np.float64))

    class Source:
        def load(self, ref):
            return ref

    images = DecodedImages(Source(), [rgb, grey, sixteen], 64, "skip", torch.float16)
    greys, errors = images.collate([images[1], "unreadable", images[1]])
    assert greys.dtype == torch.uint8 and greys.shape == (3, 64, 64, 1) and not greys[1].any()
    assert errors == {1: "unreadable"}
    eight_bit, _ = images.collate([images[0], images[1]])
    assert eight_bit.dtype == torch.uint8 and eight_bit.shape == (2, 64, 64, 3)
    assert torch.equal(eight_bit[1], greys[0].expand(-1, -1, 3))
    mixed, _ = images.collate([images[0], images[2]])
    assert mixed.dtype == torch.float16 and torch.equal(mixed[0], eight_bit[0].half())
    assert images[2].dtype == torch.float16 and images[2].shape == (64, 64, 1)

    lpm = FrozenLPM(create_backbone(MICRO, 64, random_init=True)[0], [2, 3], 0.25)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    # the channels-last uint8 batch against the LPM on the plain NCHW normalised float input, made here
    # (made contiguous: np.stack may keep its inputs' transposed memory order, as numpy 2.4.6 does, and the patch
    # convolution's result depends on the layout in its last bits)
    planes = np.stack([np.asarray(prepare_image(im, 64, 16)[0], np.float32).transpose(2, 0, 1) for im in (rgb,)])
    reference = lpm((torch.from_numpy(planes).contiguous() - torch.tensor(mean).view(1, 3, 1, 1) * 255)
                    / (torch.tensor(std).view(1, 3, 1, 1) * 255))
    encoded = encode_batch(lpm, eight_bit[:1], mean, std, "fp32")
    for name, t in encoded.items():
        assert torch.equal(t, reference[name].to(t.dtype)), name
    from_grey = encode_batch(lpm, greys, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), "fp32")
    from_rgb_float = encode_batch(lpm, greys.expand(-1, -1, -1, 3).float(), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), "fp32")
    for name, t in from_grey.items():
        assert torch.equal(t, from_rgb_float[name]), name


def test_a_worker_collates_into_shared_memory_and_sends_the_same_batch(monkeypatch):
    """In a DataLoader worker the batch is stacked straight into shared memory (no second copy to send it);
    through a real worker it arrives equal to collating in this process."""
    from PIL import Image
    from torch.utils.data import DataLoader

    from fpt.extract import encode
    from fpt.extract.run import DecodedImages

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]

    class Source:
        def load(self, ref):
            return frames[ref]

    images = DecodedImages(Source(), [0, 1, 2], 32, "fail")
    here, _ = images.collate([images[i] for i in range(3)])
    assert not here.is_shared()
    with monkeypatch.context() as m:
        m.setattr(encode, "get_worker_info", lambda: object())
        high = encode.stack_batch([images[i] for i in range(3)])
        assert high.is_shared() and torch.equal(high, here)
    loader = DataLoader(images, batch_size=3, num_workers=1, collate_fn=images.collate)
    high, errors = next(iter(loader))
    assert torch.equal(high, here) and errors == {}


def test_all_finite_equals_the_elementwise_check():
    """The one-reduction check against isfinite().all(): any inf, -inf or NaN anywhere is caught, and tensors full
    of fp16's largest values (whose fp32 sum is huge but finite) pass."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        x = torch.from_numpy(rng.standard_normal((3, 4, 5, 7)).astype(np.float16))
        for _ in range(trial % 3):
            x.view(-1)[int(rng.integers(x.numel()))] = float(rng.choice([np.inf, -np.inf, np.nan]))
        assert bool(all_finite(x)) == bool(torch.isfinite(x).all())
    for sign in (1, -1):
        assert bool(all_finite(torch.full((1 << 20,), sign * 65504.0, dtype=torch.float16)))
    both = torch.tensor([float("inf"), -float("inf")], dtype=torch.float16)
    assert not bool(all_finite(both)) and bool(all_finite(torch.empty(0, dtype=torch.float16)))


def test_precision_is_recorded_resolved_and_refused_when_it_changes(tmp_path, image_folder):
    from fpt import FptError

    store = tmp_path / "s.zarr"
    extract(micro_config(image_folder, store))
    reader = StoreReader(store)
    assert reader.attrs["extraction"]["precision"] == "fp32" and reader.attrs["last_run"]["precision"] == "fp32"
    with pytest.raises(FptError, match="extraction.precision: stored 'fp32', requested 'bf16'"):
        extract(micro_config(image_folder, store, precision="bf16"))


def test_bf16_and_fp16_autocast_run_on_a_cpu_and_stay_close_to_fp32(tmp_path, image_folder):
    stores = {p: tmp_path / f"{p}.zarr" for p in ("fp32", "bf16", "fp16")}
    for precision, store in stores.items():
        extract(micro_config(image_folder, store, precision=precision))
    ref = StoreReader(stores["fp32"]).read(range(16), ("keys", "cls", "indices"))
    for precision, eps in (("bf16", 2 ** -8), ("fp16", 2 ** -11)):      # the format's unit roundoff
        got = StoreReader(stores[precision]).read(range(16), ("keys", "cls", "indices"))
        assert StoreReader(stores[precision]).attrs["extraction"]["precision"] == precision
        np.testing.assert_allclose(got["cls"].astype(np.float32), ref["cls"].astype(np.float32), atol=0.1)
        # the LPM ran in that precision (not fp32 again): where both kept a token, its key differs, by a few
        # units of the format's roundoff relative to the keys' scale (the random micro LPM's near-uniform
        # attention makes its selection differ more than a real ViT-B's, 99.85 % in fp16 on a GPU)
        diffs, kept = [], 0
        for slot in np.ndindex(ref["indices"].shape[:3]):                   # (sample, layer, head)
            mine, theirs = list(got["indices"][slot]), list(ref["indices"][slot])
            common = sorted(set(mine) & set(theirs))
            kept += len(common)
            diffs += [np.abs(got["keys"][slot][mine.index(t)].astype(np.float32)
                             - ref["keys"][slot][theirs.index(t)].astype(np.float32)).max() for t in common]
        scale = np.abs(ref["keys"].astype(np.float32)).max()
        assert kept > 0.5 * ref["indices"].size and 0 < max(diffs) < 64 * eps * scale, (precision, max(diffs), scale)


def test_memory_stores_keep_writer_threads_even_when_processes_are_asked(tmp_path, image_folder):
    """A memory:// filesystem lives in one process: a writer process would write into its own copy."""
    import time

    from fsspec.implementations.memory import MemoryFileSystem

    url = f"memory://fpt-writers-{time.time_ns()}/s.zarr"
    try:
        assert extract(micro_config(image_folder, url, writers="processes")).n_written == 16
        reader = StoreReader(url)
        assert reader.attrs["last_run"]["writers"] == "threads" and reader.done().all()
    finally:
        MemoryFileSystem().rm(url.removeprefix("memory://").rsplit("/", 1)[0], recursive=True)


def test_shard_handover_avoids_a_full_dev_shm(monkeypatch):
    """Containers often give /dev/shm 64 MB: a shard that does not fit twice goes through the temp directory."""
    import os

    from fpt.store import shared

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    assert shared.handover_folder(1 << 20) == tempfile.gettempdir()
    assert shared.handover_folder(1 << 10) == "/dev/shm"
    Full.f_bavail = 0
    arrays = shard_arrays(3, seed=2)
    with shared.SharedArrays(arrays) as (path, spec):
        assert Path(path).parent == Path(tempfile.gettempdir())
        memory = np.memmap(path, np.uint8, "r")
        for name, a in arrays.items():
            np.testing.assert_array_equal(shared._view(memory, *spec[name]), a)
    assert not Path(path).exists()


def test_on_cuda_decoders_and_writers_may_each_use_every_core(monkeypatch):
    """One decode worker and one writer per core (2-16 writers), so the kernel gives the cores to whichever side
    the source and resolution make the limit; on a CPU the LPM keeps the cores."""
    from fpt.extract import run

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for cores, workers, writers in ((1, 1, 2), (2, 2, 2), (16, 16, 16), (64, 16, 16)):
        monkeypatch.setattr(run.os, "cpu_count", lambda: cores)
        assert (run.default_workers(cuda), run.default_write_threads(cuda)) == (workers, writers)
        assert (run.default_workers(cpu), run.default_write_threads(cpu)) == (0, 1)


def test_hand_over_slots_are_reused_grown_and_removed():
    """A stream of shards goes through as many files as are in flight at once, each filled again and again."""
    from fpt.store.shared import HandoverSlots, open_shared

    before = shared_files()
    slots = HandoverSlots()
    small, other = shard_arrays(2, seed=0), shard_arrays(2, seed=1)
    big = {**shard_arrays(3, seed=2), "more": np.ones(3 << 12, np.uint8)}     # past the small ones' pages
    with slots.put(small) as (first, spec):
        with slots.put(other) as (second, _):                   # two hand-overs at once: two files
            assert second != first
    for arrays in (other, small):
        with slots.put(arrays) as (path, spec):
            assert path in (first, second)                      # the same files again, holding the new arrays
            for name, a in open_shared(path, spec).items():
                np.testing.assert_array_equal(a, arrays[name], err_msg=name)
    with slots.put(big) as (path, spec):
        with slots.put(big) as (path2, spec2):                  # both free slots were too small: replaced
            assert {path, path2}.isdisjoint({first, second}) and not Path(first).exists()
            np.testing.assert_array_equal(open_shared(path2, spec2)["keys"], big["keys"])
    assert len(shared_files() - before) == 2
    slots.close()
    assert shared_files() == before


def test_prepared_hand_over_slots_are_waited_for_not_made_again():
    """``prepare`` makes the slots ahead (pages touched, then ``ready``); a ``take`` while they are on their way
    gets one of them, so no more files exist than were prepared; past them, ``take`` makes slots as before."""
    import time

    from fpt.store.shared import HandoverSlots

    before = shared_files()
    slots, readied = HandoverSlots(), []
    slots.prepare(1 << 16, 3, ready=lambda slot: (time.sleep(0.05), readied.append(slot.path)))
    taken = [slots.take(1 << 16) for _ in range(3)]           # faster than the preparation: each one waited for
    assert [slot.path for slot in taken] == readied and len(shared_files() - before) == 3
    assert all(slot.size >= 1 << 16 for slot in taken)
    extra = slots.take(1 << 16)                                 # nothing free, nothing coming: a new one
    assert extra.path not in readied and len(shared_files() - before) == 4
    for slot in (*taken, extra):
        slots.give(slot)
    assert slots.take(1 << 16).path in {*readied, extra.path}   # reused
    slots.close()
    assert shared_files() == before


def test_closing_hand_over_slots_while_they_are_prepared_leaves_no_file():
    import time

    from fpt.store.shared import HandoverSlots

    before = shared_files()
    slots = HandoverSlots()
    slots.prepare(1 << 16, 50, ready=lambda slot: time.sleep(0.02))
    time.sleep(0.05)
    slots.close()                                # stops after the slot in hand, removes every one made
    assert shared_files() == before


def test_a_failed_preparation_leaves_take_making_slots(tmp_path):
    from fpt.store.shared import HandoverSlots

    def refuse(slot):
        raise OSError("no")

    slots = HandoverSlots()
    slots.prepare(1 << 16, 3, ready=refuse)
    slot = slots.take(1 << 16)                    # neither hangs nor fails
    assert slot.size >= 1 << 16
    slots.close()


def test_a_writer_process_starts_with_the_store_open(tmp_path):
    """``start_writer`` (the writer processes' initializer) opens every array a shard write needs; a store it
    cannot open is left for the first write to report."""
    from fpt.store import shared

    writer = open_writer(tmp_path / "s.zarr")
    shared._writer.cache_clear()
    shared.start_writer(str(writer.location), True)
    opened = shared._writer(str(writer.location), True)._arrays
    assert {*SAMPLE_ARRAYS, "split", "done"} <= set(opened)
    shared.start_writer(str(tmp_path / "missing.zarr"), True)      # no error here
    assert shared._writer.cache_info().currsize == 1
    shared._writer.cache_clear()


def page_faults(program: str, *kinds: str) -> dict[str, int]:
    """The number ``program`` prints last (its page faults), run in a fresh process per kind (its argv[1])."""
    faults = {}
    for kind in kinds:
        done = subprocess.run([sys.executable, "-c", program, kind], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        faults[kind] = int(done.stdout.split()[-1])
    return faults


GLIBC = pytest.mark.skipif(os.uname().sysname != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")


@GLIBC
def test_reuse_freed_memory_reuses_buffers_of_growing_sizes_where_malloc_mapped_each_fresh():
    """Buffers a little bigger each time (images of growing sizes): glibc maps each one fresh (its threshold for
    that only follows the last freed size), so every page of every buffer faults in; after
    ``reuse_freed_memory`` they come from one heap, faulted in about once. In a process of its own, since the
    setting is the process's."""
    program = textwrap.dedent("""
        import resource, sys
        from fpt.store import reuse_freed_memory
        if sys.argv[1] == "reuse":
            assert reuse_freed_memory()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(16):
            buffer = bytearray((1 << 20) + i * (64 << 10))
            buffer[::4096] = bytes(len(buffer[::4096]))             # every page touched
            del buffer
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = page_faults(program, "plain", "reuse")
    largest = ((1 << 20) + 15 * (64 << 10)) // 4096
    assert faults["plain"] > 10 * largest, faults                   # 16 buffers, each faulted in
    assert faults["reuse"] < 2 * largest, faults                    # about one buffer's pages


def test_decode_workers_and_writer_processes_start_at_the_helpers_priority_with_their_memory_reused(
        tmp_path, image_folder, monkeypatch):
    """Each of extraction's decode workers runs ``reuse_freed_memory`` as it starts (the DataLoader's
    ``worker_init_fn``; forked, so the spy is theirs too), at the CPU priority ``helper_niceness`` gives (made to
    give 3 here, as it does on CUDA); so does each writer process (asked for its niceness before the pool ends).
    This process's own priority is unchanged."""
    from fpt.extract import run
    from fpt.store import shared

    own = os.nice(0)
    started = tmp_path / "started"
    monkeypatch.setattr(shared, "reuse_freed_memory",
                        lambda: started.open("a").write(f"{os.getpid()} {os.nice(0)}\n"))
    monkeypatch.setattr(run, "helper_niceness", lambda device: 3)
    writers: list[int] = []

    class AskingWriters(run.ShardWriterPool):
        def __exit__(self, *exc):
            writers.extend(self.processes.submit(os.nice, 0).result() for _ in range(self.threads))
            return super().__exit__(*exc)

    monkeypatch.setattr(run, "ShardWriterPool", AskingWriters)
    extract(micro_config(image_folder, tmp_path / "s.zarr", workers=2, writers="processes", write_threads=2))
    workers = dict(line.split() for line in started.read_text().splitlines())
    assert len(workers) == 2 and str(os.getpid()) not in workers, workers
    assert set(workers.values()) == {str(min(own + 3, 19))}, workers
    assert set(writers) == {min(own + 3, 19)} and os.nice(0) == own, writers


@GLIBC
def test_a_writer_process_reuses_the_memory_it_frees_instead_of_faulting_in_fresh_pages(tmp_path):
    """After ``start_writer``, the buffers that encoding shard after shard makes and frees (zstd-1: Blosc's
    output, numcodecs' and zarr's copies of it) reuse the same memory, whose pages fault in once, not shard after
    shard. Counted in a process of its own, since the setting is the process's: shards of ViT-B's size at 512."""
    program = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from fpt.store import Geometry, StoreWriter
        from fpt.store.shared import start_writer
        if sys.argv[1] == "writer":
            start_writer({str(tmp_path / "missing.zarr")!r}, True)
        g = Geometry(n_samples=96, layers=6, heads=12, k=205, head_dim=64, embed_dim=8, image_res=4,
                     samples_per_shard=16)
        rng = np.random.default_rng(0)
        kv = rng.standard_normal((16, 6, 12, 205, 64)).astype(np.float16)
        shard = {{"keys": kv, "values": kv[::-1].copy(), "indices": np.zeros((16, 6, 12, 205), np.int32),
                  "cls": np.zeros((16, 8), np.float16), "images": np.zeros((16, 4, 4, 3), np.uint8)}}
        attrs = {{"backbone": {{"name": "x"}}, "extraction": {{}}, "dataset": {{"name": "t", "classes": ["a", "b"]}},
                  "normalization": {{}}}}
        writer = StoreWriter.open({str(tmp_path)!r} + "/" + sys.argv[1] + ".zarr", g, attrs,
                                  ids=np.array([f"s{{i}}" for i in range(96)], dtype=object),
                                  labels=np.zeros(96, int), split=np.zeros(96, int), codec="zstd-1")
        writer.write_shard(0, shard)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for s in range(1, 6):
            writer.write_shard(s, shard)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = page_faults(program, "plain", "writer")
    chunk_pages = 16 * 6 * 12 * 205 * 64 * 2 // 4096                # one K (or V) chunk's pages
    assert faults["plain"] > 3 * chunk_pages, faults                # fresh pages, shard after shard
    assert faults["writer"] < chunk_pages, faults                   # reused (a few pages of other things)


def test_a_writer_process_reads_each_hand_over_fresh_through_its_kept_mapping(tmp_path):
    """write_shared_shard keeps one mapping per slot; new contents, and a new file under the same name, are seen."""
    from fpt.store.shared import SharedSlot, handover_spec_of, write_shared_shard

    writer = open_writer(tmp_path / "s.zarr")
    a, b, c = (shard_arrays(3, seed=s) for s in (0, 1, 2))
    slot = SharedSlot(handover_spec_of(a)[1])
    try:
        for shard, arrays in ((0, a), (1, b)):
            write_shared_shard(str(writer.location), True, shard, *slot.put(arrays))
    finally:
        slot.close()
    with open(slot.path, "wb") as f:                                # another file under the same name and size
        f.write(bytes(slot.size))
    try:
        memory = np.memmap(slot.path, np.uint8, "r+")
        spec = handover_spec_of(c)[0]
        for name, arr in c.items():
            offset, shape, dtype = spec[name]
            memory[offset:offset + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        memory.flush()
        write_shared_shard(str(writer.location), True, 0, slot.path, spec)
    finally:
        os.unlink(slot.path)
    read = StoreReader(tmp_path / "s.zarr").read(range(6), ("keys", "indices"))
    for name in ("keys", "indices"):
        np.testing.assert_array_equal(read[name], np.concatenate([c[name], b[name]]), err_msg=name)


def test_the_runs_start_and_end_stages_are_timed_in_order(tmp_path, image_folder):
    """``moments_seconds``: when each stage of the start and of the end was over, in the order they happen, within
    the run, the end's after the last written shard (writer processes, as on CUDA, to have all of them)."""
    result = extract(micro_config(image_folder, tmp_path / "s.zarr", workers=1, writers="processes",
                                  write_threads=2))
    moments = result.moments_seconds
    assert list(moments) == ["decode_workers_forked", "writer_pool_started", "loop_done", "shards_written",
                             "writer_processes_stopped", "writers_done"]
    assert 0 < moments["decode_workers_forked"] < result.first_batch_seconds
    assert list(moments.values()) == sorted(moments.values()) and moments["writers_done"] <= result.seconds
    assert moments["shards_written"] >= result.last_shard_seconds


def test_the_run_records_the_batch_size_and_writers_it_chose(tmp_path, image_folder):
    """Options left to their defaults are recorded as the values the loop ran with, not as None."""
    from fpt.extract.run import default_batch_size, default_workers, default_write_threads

    extract(micro_config(image_folder, tmp_path / "s.zarr", batch_size=None, workers=None, write_threads=None))
    run, g = StoreReader(tmp_path / "s.zarr").attrs["last_run"], StoreReader(tmp_path / "s.zarr").geometry
    cpu = torch.device("cpu")
    assert ((run["batch_size"], run["workers"], run["write_threads"])
            == (default_batch_size(cpu), default_workers(cpu), default_write_threads(cpu)))
    filling = (run["batch_size"] - 1) // g.samples_per_shard + 2
    assert run["host_buffer_limit_mb"] == round((run["write_threads"] + filling) * g.samples_per_shard
                                                * g.bytes_per_sample() / 2**20, 1)


def test_the_steady_rate_counts_from_the_first_finished_shard(tmp_path, image_folder):
    result = extract(micro_config(image_folder, tmp_path / "s.zarr", samples_per_shard=2))
    run = StoreReader(tmp_path / "s.zarr").attrs["last_run"]
    assert result.steady_images_per_s and run["steady_images_per_s"] == round(result.steady_images_per_s, 3)
    assert 0 < result.first_batch_seconds <= result.first_copied_seconds <= result.first_shard_seconds
    assert result.first_shard_seconds < result.last_shard_seconds <= result.seconds
    few = extract(micro_config(image_folder, tmp_path / "t.zarr", samples_per_shard=8))     # 2 shards
    assert few.steady_images_per_s is None
    again = extract(micro_config(image_folder, tmp_path / "t.zarr", samples_per_shard=8))   # nothing to do
    assert again.n_written == 0 and again.first_shard_seconds is None and again.first_batch_seconds is None


def test_shard_clock_rate_leaves_out_the_time_before_the_first_shard():
    from fpt.extract.timing import ShardClock

    times = iter([10.0, 11.0, 12.5, 14.0])                  # the first shard took 10 s to arrive
    clock = ShardClock(now=lambda: next(times))
    for _ in range(4):
        clock.shard_written(4)
    assert clock.marks == [(10.0, 4), (11.0, 8), (12.5, 12), (14.0, 16)]
    assert clock.steady_images_per_s() == (16 - 4) / (14.0 - 10.0)
    assert clock.first_shard_seconds(start=2.0) == 8.0 and clock.last_shard_seconds(start=2.0) == 12.0
    assert ShardClock().steady_images_per_s() is None


def test_shards_are_timed_when_their_writes_end_not_when_the_loop_next_looks():
    """With 4 writer threads the loop confirms (and reports) a shard only once 4 wait; the clock must not wait so,
    or the start would count the time the loop took to fill 4 more shards."""
    from concurrent.futures import wait

    from fpt.extract.shard_writing import ShardWriterPool
    from fpt.extract.timing import ShardClock

    class Written:             # a ShardBuffer whose copies are done
        slot, excluded = None, []

        def __init__(self, i):
            self.shard, self.rows = i, range(2 * i, 2 * i + 2)

        def seal(self):
            pass

        def copied(self):
            pass

        def numpy(self):
            return {}

    class Writer:
        def write_shard(self, shard, arrays, excluded):
            pass

    clock, reported = ShardClock(), []
    with ShardWriterPool(Writer(), 4, lambda done, total: reported.append(done), 6, clock=clock) as pool:
        for i in range(3):
            pool.submit(Written(i))
        wait([future for future, _ in pool.pending])
        assert [n for _, n in clock.marks] == [2, 4, 6] and reported == []    # written; not yet confirmed
        assert clock.first_copied is not None and clock.first_copied <= clock.marks[0][0]
    assert reported == [2, 4, 6]


@pytest.mark.parametrize("section, key", [("extraction", "precision"), ("backbone", "published_params")])
def test_a_store_from_before_a_key_was_recorded_is_still_resumed(tmp_path, image_folder, section, key):
    """precision: fpt 0.1.0 wrote none; published_params (the LPM as timm publishes it, the learnable share's
    total), from 2026-11-28 on: an older store's share is over the LPM as it runs (n_params)."""
    import zarr

    from fpt.train.model import lpm_parameters

    store = tmp_path / "s.zarr"
    extract(micro_config(image_folder, store, samples_per_shard=4))
    group = zarr.open_group(store, mode="r+")
    attrs = dict(group.attrs[section])
    if key == "published_params":       # the micro LPM with its default 1000-class head, at its default size
        assert attrs[key] == attrs["n_params"] + 1000 * (attrs["embed_dim"] + 1)    # its head; same res (64)
        assert lpm_parameters(attrs) == attrs[key]
    del attrs[key]                                             # as written before the key existed
    group.attrs[section] = attrs
    assert extract(micro_config(image_folder, store, samples_per_shard=4)).n_written == 0     # complete: no refusal
    if key == "published_params":
        backbone = StoreReader(store).attrs["backbone"]
        assert lpm_parameters(backbone) == backbone["n_params"]


def test_a_store_whose_low_res_copies_were_made_the_old_way_is_not_resumed_with_the_new(tmp_path, image_folder):
    """Stores from before ``extraction.low_res`` made the copies with PIL's BOX resize: finishing one with the area
    mean would mix two kinds of copies in one store, so it is refused, naming the setting."""
    import zarr

    from fpt import FptError

    store = tmp_path / "s.zarr"
    extract(micro_config(image_folder, store, samples_per_shard=4))
    assert StoreReader(store).attrs["extraction"]["low_res"] == "area"
    group = zarr.open_group(store, mode="r+")
    extraction = dict(group.attrs["extraction"])
    del extraction["low_res"]                                  # as written before the key existed
    group.attrs["extraction"] = extraction
    with pytest.raises(FptError, match="extraction.low_res: stored 'pil-box', requested 'area'"):
        extract(micro_config(image_folder, store, samples_per_shard=4))


def test_hand_over_files_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys

    from fpt.store import shared

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.setattr(shared.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(shared, "_cleaned", [])
    stale, alive = tmp_path / f"fpt-shared-{dead}-abc", tmp_path / f"fpt-shared-{os.getpid()}-abc"
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    shared.remove_stale()
    assert not stale.exists() and alive.exists()


def test_intra_op_threads_are_set_inside_the_block_and_restored_after_it():
    from fpt.extract.run import intra_op_threads

    before = torch.get_num_threads()
    with intra_op_threads(None):
        assert torch.get_num_threads() == before
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="boom"), intra_op_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_the_extraction_loop_runs_on_one_intra_op_thread_only_on_cuda(tmp_path, image_folder, device):
    """On CUDA the loop's thread does only small CPU copies, and each OpenMP region would leave the team spinning
    on cores the decoders and writers need; on a CPU the LPM runs there and keeps every thread."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []
        extract(micro_config(image_folder, tmp_path / "s.zarr", device=device),
                progress=lambda done, total: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == ({1} if device == "cuda" else {2})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_loop_waits_add_up_the_time_spent_waiting_for_each_stage():
    from fpt.extract.timing import LoopWaits

    ticks = iter(range(0, 100, 1))
    waits = LoopWaits(now=lambda: float(next(ticks)))
    assert list(waits.batches(["a", "b"])) == ["a", "b"]
    assert waits.decoding == 3.0 and waits.writing == 0.0      # two batches and the end, one tick each
    with pytest.raises(ValueError), waits.waiting("writing"):
        raise ValueError                                        # a wait ended by an error still counts
    assert waits.writing == 1.0


def test_the_first_batch_is_timed_when_it_arrives_not_when_the_loop_began_waiting_for_it():
    """``first_batch`` (the start's decoding part) is when the first decoded batch reached the loop: the decode
    workers' start-up and first images are in it; a loader that yields nothing leaves it None."""
    from fpt.extract.timing import LoopWaits

    clock = [0.0]

    def loader(decoding_s: float):
        clock[0] += decoding_s                                  # the first batch takes this long to decode
        yield "a"

    waits = LoopWaits(now=lambda: clock[0])
    assert list(waits.batches(loader(5.0))) == ["a"]
    assert waits.first_batch == clock[0] == waits.decoding
    empty = LoopWaits(now=lambda: clock[0])
    assert list(empty.batches([])) == [] and empty.first_batch is None


def test_the_loop_stays_a_few_batches_ahead_of_the_device_waiting_asleep_in_device_time():
    """``DeviceLead``: after each batch an event is recorded; with more than 2 in flight the loop waits for the
    oldest (in order), and that wait counts as waiting for the device. Without events (a CPU) it never waits."""
    from fpt.extract.timing import DeviceLead, LoopWaits

    log = []

    class Event:
        def __init__(self):
            self.n = len([e for e in log if e[0] == "record"])

        def record(self):
            log.append(("record", self.n))

        def synchronize(self):
            log.append(("wait", self.n))

    ticks = iter(range(100))
    waits = LoopWaits(now=lambda: float(next(ticks)))
    lead = DeviceLead(waits, Event, batches=2)
    for _ in range(5):
        lead.issued()
    assert [e for e in log if e[0] == "wait"] == [("wait", 0), ("wait", 1), ("wait", 2)]
    assert log.index(("wait", 0)) == log.index(("record", 2)) + 1       # the third batch waits for the first
    assert waits.device == 3.0 and waits.decoding == waits.writing == 0.0
    cpu = DeviceLead(LoopWaits(), None)
    for _ in range(5):
        cpu.issued()
    assert not cpu.in_flight


def test_the_result_names_the_stage_the_loop_waited_for():
    from fpt.extract.run import ExtractResult

    def result(decoding, writing):
        return ExtractResult("s", 8, 8, 10.0, 0.8, 0.0, waited_for_decoding_s=decoding, waited_for_writers_s=writing)

    assert result(6.0, 1.0).limit() == ("decoding", 0.6)
    assert result(1.0, 5.0).limit() == ("writing", 0.5)
    assert result(2.0, 1.0).limit() == ("model", 0.7)
    assert result(4.0, 3.0).limit() == ("decoding", 0.4)                      # the largest share, not a majority
    assert ExtractResult("s", 8, 8, 10.0, 0.8, 0.0).limit() is None           # dask: not measured


def test_an_extraction_counts_its_waits_for_decoding_and_for_writers(tmp_path, image_folder, monkeypatch):
    """Slow decoding (no workers: the loop decodes) and slow writes (one writer thread) show up in the loop's
    waits, at least as long as the sleeps put there."""
    import time

    from fpt.extract import run
    from fpt.store import StoreWriter

    load = run.DecodedImages.__getitem__
    monkeypatch.setattr(run.DecodedImages, "__getitem__", lambda self, i: (time.sleep(0.02), load(self, i))[1])
    write = StoreWriter.write_shard
    monkeypatch.setattr(StoreWriter, "write_shard", lambda self, *a, **k: (time.sleep(0.1), write(self, *a, **k))[1])
    result = extract(micro_config(image_folder, tmp_path / "s.zarr", workers=0, write_threads=1))
    assert result.waited_for_decoding_s >= 0.02 * result.n_written
    assert result.waited_for_writers_s >= 0.1           # the last shard's write, which nothing else overlaps
    assert result.waited_for_device_s == pytest.approx(0, abs=0.05)    # a CPU's shards are copied at once
    assert result.waited_for_decoding_s + result.waited_for_device_s + result.waited_for_writers_s <= result.seconds
    run_attrs = StoreReader(tmp_path / "s.zarr").attrs["last_run"]
    assert run_attrs["waited_for_writers_s"] == round(result.waited_for_writers_s, 3)


def test_the_writer_pool_counts_the_wait_for_a_shards_device_copies_apart_from_its_write():
    """A run whose GPU is the slower side waits for the shards' copies, not for the writers: counted apart, so
    that the verdict does not send the user to add writers."""
    import time

    from fpt.extract.shard_writing import ShardWriterPool
    from fpt.extract.timing import LoopWaits

    class SlowCopies:          # a ShardBuffer whose copies from the device take 50 ms
        slot = None

        def __init__(self, i):
            self.shard, self.rows, self.excluded = i, range(2 * i, 2 * i + 2), []

        def seal(self):
            pass

        def copied(self):
            time.sleep(0.05)

        def numpy(self):
            self.copied()
            return {}

    class Writer:
        def write_shard(self, shard, arrays, excluded):
            pass

    waits = LoopWaits()
    with ShardWriterPool(Writer(), 1, None, 6, waits=waits) as pool:
        for i in range(3):
            pool.submit(SlowCopies(i))
    assert pool.written == 6
    assert waits.device >= 3 * 0.05                 # each shard waited for by the loop: two handed on, one drained


@pytest.mark.parametrize("run_as", ["script", "module"])
def test_writer_processes_do_not_each_import_the_programs_main_module(tmp_path, image_folder, run_as):
    """A program that imports something heavy at its top (torch, as a user's script or ``python -m
    fpt.bench.gpu`` does) runs that import once more for all its writer processes (in the fork server they are
    forked from, ``fpt.forkserver``), not once in each of them as spawned processes do. Every import of the
    program's main module adds a line to a file: the program's own and the server's, with three writer
    processes; run as a script (``python program.py``) and as a module (``python -m program``)."""
    imports, out = tmp_path / "imports.txt", tmp_path / "s.zarr"
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent(f"""
        import os
        with open({str(imports)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        if __name__ == "__main__":
            from fpt.config import extract_config
            from fpt.extract import extract
            extract(extract_config(None, {str(image_folder)!r}, out={str(out)!r}, backbone="vit_tiny_patch16_224",
                                   random_init=True, res=32, image_res=16, batch_size=4, device="cpu",
                                   samples_per_shard=4, writers="processes", write_threads=3))
    """))
    command = [sys.executable, str(program)] if run_as == "script" else [sys.executable, "-m", "program"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert StoreReader(out).done().all()
    assert len(imports.read_text().split()) == 2


def test_the_fork_server_is_told_the_main_module_a_spawned_child_would_run(monkeypatch):
    """``main_module``: a program run as ``python -m program`` or ``python program.py`` is named to the fork server
    (it runs it as a spawned child would); a package's ``__main__`` (``python -m package``) is not, as spawned
    children skip it (it would run the package's command again in the server), nor is an interactive session.
    ``starting`` names it only inside its block, and leaves a name an outer block set."""
    from multiprocessing import spawn

    from fpt import forkserver

    cases = [({"init_main_from_name": "program"}, "name:program"), ({"init_main_from_name": "pkg.__main__"}, None),
             ({"init_main_from_name": "__main__"}, None), ({"init_main_from_path": "/x/program.py"},
                                                            "path:/x/program.py"), ({}, None)]
    for data, want in cases:
        monkeypatch.setattr(spawn, "get_preparation_data", lambda name, data=data: dict(data))
        assert forkserver.main_module() == want, data
    monkeypatch.setattr(spawn, "get_preparation_data", lambda name: {"init_main_from_name": "program"})
    monkeypatch.delenv(forkserver.MAIN_ENV, raising=False)
    with forkserver.starting():
        assert os.environ[forkserver.MAIN_ENV] == "name:program"
        with forkserver.starting():
            assert os.environ[forkserver.MAIN_ENV] == "name:program"
        assert os.environ[forkserver.MAIN_ENV] == "name:program"
    assert forkserver.MAIN_ENV not in os.environ
    monkeypatch.setenv(forkserver.MAIN_ENV, "path:/outer.py")
    with forkserver.starting():
        assert os.environ[forkserver.MAIN_ENV] == "path:/outer.py"
    assert os.environ[forkserver.MAIN_ENV] == "path:/outer.py"


def test_a_script_that_calls_fpt_unguarded_fails_with_one_clear_error_not_a_wait(tmp_path, image_folder):
    """A script that calls ``extract`` at its top level, not under ``if __name__ == "__main__":``, has it run
    again by the writer processes' fork server, which then dies. That must end the run with an FptError that says
    what to do: a DataLoader worker forked while a writer process was starting kept the fork server's pipe open,
    and the run then waited forever (seen once in two runs of 4 workers and 4 writers before the fix)."""
    out = tmp_path / "s.zarr"
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent(f"""
        from fpt.config import extract_config
        from fpt.extract import extract
        extract(extract_config(None, {str(image_folder)!r}, out={str(out)!r}, backbone="vit_tiny_patch16_224",
                               random_init=True, res=32, image_res=16, batch_size=4, device="cpu",
                               samples_per_shard=4, writers="processes", write_threads=3, workers=3))
    """))
    done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fpt.FptError: a writer process ended before shard") and "__main__" in last, last


def test_a_decode_worker_killed_mid_run_is_one_clear_error_and_the_finished_shards_stay(tmp_path, image_folder,
                                                                                       monkeypatch):
    """A decode worker killed mid-run (the kernel's OOM killer, say) ends the run with an FptError, not torch's
    RuntimeError and traceback, and the shards finished before it stay done, so a re-run resumes."""
    import signal

    from fpt import FptError
    from fpt.extract import run

    real, out = run.DecodedImages.__getitem__, tmp_path / "s.zarr"

    def killed_once_a_shard_is_done(self, i):
        if i == 12 and torch.utils.data.get_worker_info() is not None:
            for _ in range(600):
                if StoreReader(out).done().any():
                    break
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(run.DecodedImages, "__getitem__", killed_once_a_shard_is_done)
    with pytest.raises(FptError, match=r"a decode worker died \(DataLoader worker .*re-run the same command"):
        extract(micro_config(image_folder, out, workers=1, batch_size=4))
    done = StoreReader(out).done()
    assert 0 < done.sum() < len(done)
    monkeypatch.setattr(run.DecodedImages, "__getitem__", real)
    extract(micro_config(image_folder, out, workers=1, batch_size=4))
    assert StoreReader(out).done().all()


def test_the_decode_workers_fork_before_the_writer_pool_starts_and_stop_before_it_ends(tmp_path, image_folder,
                                                                                       monkeypatch):
    """The decode workers' life against the writer pool's. They fork before the pool starts any process, which
    keeps a dead fork server from going unnoticed (see ``ShardWriterPool``). They stop once the last batch is in,
    before the pool waits for the last shards, so that their exit overlaps those writes (it came after them, when
    the loader's iterator was dropped: ~0.1 s of a run's end)."""
    from fpt.extract import run

    events, iterators = [], []

    class Loader(run.DataLoader):
        def __iter__(self):
            events.append("decode workers")
            iterators.append(super().__iter__())
            return iterators[-1]

    class Pool(run.ShardWriterPool):
        def __init__(self, *args, **kwargs):
            events.append("writer pool")
            super().__init__(*args, **kwargs)

        def __exit__(self, *exc):
            alive = any(w.is_alive() for w in iterators[0]._workers)         # torch's worker processes
            events.append(f"pool exit, decode workers {'alive' if alive else 'gone'}")
            return super().__exit__(*exc)

    monkeypatch.setattr(run, "DataLoader", Loader)
    monkeypatch.setattr(run, "ShardWriterPool", Pool)
    extract(micro_config(image_folder, tmp_path / "s.zarr", workers=2))
    assert events == ["decode workers", "writer pool", "pool exit, decode workers gone"]


def test_the_warm_up_step_runs_on_zeros_before_the_first_batch_and_changes_nothing(tmp_path, image_folder,
                                                                                    monkeypatch):
    """On CUDA the loop runs the LPM once on zeros while the decode workers start (``warms_up``): forced here on
    the CPU, one call of the LPM on a batch of zeros of the run's shape comes first, and the store is the one a
    run without it writes."""
    from fpt.extract import run

    plain, warmed = tmp_path / "plain.zarr", tmp_path / "warmed.zarr"
    extract(micro_config(image_folder, plain, workers=1))
    calls, real = [], run.encode_batch

    def spy(lpm, high, *args, **kwargs):
        calls.append((tuple(high.shape), bool((high == 0).all())))
        return real(lpm, high, *args, **kwargs)

    monkeypatch.setattr(run, "encode_batch", spy)
    monkeypatch.setattr(run, "warms_up", lambda device, workers: workers > 0)
    result = extract(micro_config(image_folder, warmed, workers=1))
    assert calls[0] == ((3, 64, 64, 3), True) and not any(zero for _, zero in calls[1:])
    assert len(calls) == 1 + -(-16 // 3)                    # the warm-up, then 16 images in batches of 3
    assert_same_store(plain, warmed)
    assert result.warm_up_seconds > 0
    calls.clear()                                           # the same LPM again (a dask worker's next shard task)
    assert extract(micro_config(image_folder, tmp_path / "again.zarr", workers=1)).warm_up_seconds is None
    assert not any(zero for _, zero in calls)               # once per LPM: no second warm-up


def test_unreadable_images_in_batches_across_shard_ends_are_skipped_where_they_are(tmp_path, image_folder):
    """--on-error skip with batches of 3 over shards of 2: each unreadable image is excluded from its own shard
    (a batch's positions map to the shard each row belongs to), as in a run of one image per batch. Rows 2 and 4
    are each the first row of a batch's second part: batch 0 is shard 0's rows 0-1 and shard 1's row 2, batch 1
    shard 1's row 3 and shard 2's rows 4-5."""
    broken = sorted((image_folder / "train").rglob("*.png"))[2:5:2]
    for path in broken:
        path.write_bytes(b"not a png")
    one, three = tmp_path / "one.zarr", tmp_path / "three.zarr"
    extract(micro_config(image_folder, one, on_error="skip", batch_size=1, samples_per_shard=2))
    result = extract(micro_config(image_folder, three, on_error="skip", batch_size=3, samples_per_shard=2))
    assert result.n_skipped == 2
    assert_same_store(one, three)
    reader = StoreReader(three)
    skipped = sorted(str(reader.ids[i]) for i in np.flatnonzero(reader.split == 255))
    assert skipped == sorted(str(p.relative_to(image_folder)) for p in broken)


def test_unreadable_images_are_excluded_by_writer_processes_as_by_threads(tmp_path, image_folder):
    """--on-error skip with writer processes (CUDA's default): the excluded rows reach the process that writes
    their shard, which marks them excluded as a writer thread does."""
    broken = sorted((image_folder / "train").rglob("*.png"))[1:4:2]
    for path in broken:
        path.write_bytes(b"not a png")
    threads, processes = tmp_path / "threads.zarr", tmp_path / "processes.zarr"
    extract(micro_config(image_folder, threads, on_error="skip", samples_per_shard=2, writers="threads"))
    result = extract(micro_config(image_folder, processes, on_error="skip", samples_per_shard=2,
                                  writers="processes", write_threads=2))
    assert result.n_skipped == 2
    assert_same_store(threads, processes)
    reader = StoreReader(processes)
    skipped = sorted(str(reader.ids[i]) for i in np.flatnonzero(reader.split == 255))
    assert skipped == sorted(str(p.relative_to(image_folder)) for p in broken)


def test_sources_skipped_by_dask_shard_tasks_are_all_reported(tmp_path, image_folder, monkeypatch):
    """--on-error skip on dask: each shard task returns the sources it skipped and the run adds them up, so the
    count, the skipped-sample report and the excluded rows are a run's in one process (the local cluster's
    worker is a thread of this process here, as a sweep's may be, to keep the test quick; one, since a thread
    shares this process's LPM, which runs one batch at a time)."""
    from functools import partial

    from fpt.extract import run

    broken = sorted((image_folder / "train").rglob("*.png"))[2:5:2]        # in shards 1 and 2
    for path in broken:
        path.write_bytes(b"not a png")
    monkeypatch.setattr(run, "dask_client", partial(run.dask_client, processes=False))
    here = extract(micro_config(image_folder, tmp_path / "here.zarr", on_error="skip", samples_per_shard=2))
    tasks = extract(micro_config(image_folder, tmp_path / "tasks.zarr", on_error="skip", samples_per_shard=2),
                    scheduler="local:1")
    assert tasks.n_written == here.n_written == 16 and tasks.n_skipped == here.n_skipped == 2
    assert_same_store(here.path, tasks.path)
    assert Path(tasks.skipped_report).read_text() == Path(here.skipped_report).read_text()
    assert len(Path(tasks.skipped_report).read_text().splitlines()) == 3               # a header, 2 sources


def test_overwrite_keeps_the_store_it_replaces_until_the_new_one_is_complete(tmp_path, image_folder):
    """--overwrite moves the old store beside the new one (<store>.replaced): a new extraction that fails (an
    unreadable image found late) loses nothing, and says where the old store is; the same command, once the image
    is fixed, resumes the new store, and the old one goes only when the new one is complete."""
    import shutil

    out, kept = tmp_path / "s.zarr", tmp_path / "s.zarr.replaced"
    extract(micro_config(image_folder, out))
    shutil.copytree(out, tmp_path / "copy.zarr")
    last = image_folder / "test" / "malignant" / "001.png"
    good = last.read_bytes()
    last.write_text("not an image")
    with pytest.raises(FptError, match=f"cannot read.*kept at {kept} until the new one is complete"):
        extract(micro_config(image_folder, out, token_ratio=0.5, overwrite=True))
    assert_same_store(kept, tmp_path / "copy.zarr")                     # the old store, whole
    assert not StoreReader(out).done().all()                            # the new one, unfinished
    with pytest.raises(FptError, match=f"unfinished store of an --overwrite that stopped.*kept at {kept}: to go back "
                                       f"to it, delete {out} and rename"):
        extract(micro_config(image_folder, out))                        # the first command again: says what it is
    last.write_bytes(good)
    resumed = extract(micro_config(image_folder, out, token_ratio=0.5, overwrite=True))
    assert 0 < resumed.n_written < 16 and not kept.exists()            # resumed, then the old one removed
    extract(micro_config(image_folder, tmp_path / "fresh.zarr", token_ratio=0.5))
    assert_same_store(out, tmp_path / "fresh.zarr")
    extract(micro_config(image_folder, out, overwrite=True))             # a complete run leaves nothing beside
    assert not kept.exists() and StoreReader(out).attrs["extraction"]["token_ratio"] == 0.2
    shutil.copytree(tmp_path / "copy.zarr", kept)       # kept beside a complete store: which is the one to keep?
    with pytest.raises(FptError, match="holds the store an earlier --overwrite replaced, and .* is not the unfinished"):
        extract(micro_config(image_folder, out, token_ratio=0.5, overwrite=True))
    assert_same_store(kept, tmp_path / "copy.zarr")
    assert StoreReader(out).done().all()


def test_overwrite_never_replaces_a_zarr_store_that_fpt_did_not_write(tmp_path, image_folder, monkeypatch):
    """Refused before the LPM loads (as any check that needs no LPM is)."""
    import zarr

    from fpt.extract import run

    out = tmp_path / "other.zarr"
    group = zarr.open_group(out, mode="w", zarr_format=3)
    group.create_array("mydata", shape=(3,), dtype="int32")[:] = [1, 2, 3]
    monkeypatch.setattr(run, "load_lpm", lambda *args: pytest.fail("the LPM was loaded"))
    for overwrite in (False, True):
        with pytest.raises(FptError, match="Zarr store that fpt did not write"):
            extract(micro_config(image_folder, out, overwrite=overwrite))
    assert zarr.open_group(out, mode="r")["mydata"][:].tolist() == [1, 2, 3]
    assert not (tmp_path / "other.zarr.replaced").exists()
