"""Store round trip, shard-wise done flags, resume, refusal of mismatched stores, dask views."""
import json
import re

import numpy as np
import pytest

from fpt import FptError
from fpt.store import CODECS, StoreReader, StoreWriter, as_dask, summarize, verify
from tests.helpers import ATTRS, GEOM, open_writer, shard_arrays


def test_round_trip_is_identical(tmp_path):
    w = open_writer(tmp_path / "s.zarr")
    written = {s: shard_arrays(len(GEOM.shard_range(s)), s) for s in range(GEOM.n_shards())}
    for s, arrays in written.items():
        w.write_shard(s, arrays)
    r = StoreReader(tmp_path / "s.zarr")
    r.require_complete()
    every = r.read(range(7), ("keys", "values", "indices", "cls", "images"))
    for name in ("keys", "values", "indices", "cls", "images"):
        expected = np.concatenate([written[s][name] for s in range(3)])
        assert every[name].dtype == expected.dtype
        np.testing.assert_array_equal(every[name], expected)
    # any order in, same order out; runs of rows across shard boundaries and repeats
    for idx in ([5, 0, 3], [1, 2, 3, 4, 6], [6, 2, 3, 2], []):
        some = r.read(idx, ("keys", "images"))
        np.testing.assert_array_equal(some["keys"], every["keys"][idx])
        np.testing.assert_array_equal(some["images"], every["images"][idx])
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, 6), max_size=12), st.booleans())
    def any_rows_in_any_order(idx, in_order):
        idx = sorted(idx) if in_order else idx
        some = r.read(idx, ("keys", "images"))
        for name in ("keys", "images"):
            np.testing.assert_array_equal(some[name], every[name][idx])
            assert some[name].flags.writeable and some[name].shape[0] == len(idx)
        # into arrays given (a reader's slot): filled in place, whatever the order; labels too
        layout = r.row_layout(("keys", "images"))
        out = {n: np.full((len(idx), *shape), 7, dtype) for n, (shape, dtype) in layout.items() if n != "images"}
        into = r.read(idx, ("keys", "images"), out=out)
        assert into["keys"] is out["keys"] and into["labels"] is out["labels"]
        for name in ("keys", "images", "labels"):
            np.testing.assert_array_equal(into[name], some[name])

    any_rows_in_any_order()
    layout = r.row_layout(("keys",))
    assert layout == {"keys": (every["keys"].shape[1:], every["keys"].dtype), "labels": ((), np.dtype(np.int64))}
    for wrong in (np.empty((2, *layout["keys"][0]), np.float32), np.empty((3, *layout["keys"][0]), np.float16)[::-1],
                  np.empty((4, *layout["keys"][0]), np.float16)):
        with pytest.raises(ValueError):
            r.read([0, 1, 2] if len(wrong) != 2 else [0, 1], ("keys",), out={"keys": wrong})
    with pytest.raises(ValueError):
        r.read([0], ("keys",), out={"images": np.empty((1, *every["images"].shape[1:]), np.uint8)})
    some = r.read([5, 0, 3], ("keys",))
    np.testing.assert_array_equal(some["labels"], [1, 0, 1])
    assert list(r.ids) == [f"s{i}" for i in range(7)] and r.classes == ["a", "b"]
    np.testing.assert_array_equal(r.split_indices("val"), [3, 4])


def test_rows_are_read_in_one_slice_per_chunk_or_run():
    """chunk_spans: rows sharing a chunk or following each other make one span (one slice, each chunk
    decompressed once); the rows between those of one span are read and dropped."""
    from hypothesis import given, strategies as st

    from fpt.store.reader import chunk_spans

    assert [s.tolist() for s in chunk_spans(np.array([0, 2, 4, 5, 6, 9, 9]), 3)] == [[0, 2], [4, 5, 6], [9, 9]]
    assert [s.tolist() for s in chunk_spans(np.array([0, 2, 3, 5]), 1)] == [[0], [2, 3], [5]]

    @given(st.lists(st.integers(0, 200), max_size=60), st.integers(1, 20))
    def spans_cover_the_rows_and_split_only_where_both_differ(rows, chunk):
        rows = np.sort(np.array(rows, dtype=np.int64))
        spans = chunk_spans(rows, chunk)
        assert np.array_equal(np.concatenate(spans) if spans else rows, rows)
        for span in spans:
            assert all(b - a == 1 or a // chunk == b // chunk for a, b in zip(span, span[1:]))
        for left, right in zip(spans, spans[1:]):
            a, b = left[-1], right[0]
            assert b - a != 1 and a // chunk != b // chunk

    spans_cover_the_rows_and_split_only_where_both_differ()


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_codec_is_lossless_and_recorded_in_the_arrays_metadata(tmp_path, codec):
    """Each --codec reaches zarr.json with its compressor, level, shuffle and block size (so any Zarr v3 reader
    decodes it), and gives back exactly what was written."""
    w = open_writer(tmp_path / "s.zarr", codec=codec)
    written = {s: shard_arrays(len(GEOM.shard_range(s)), s) for s in range(GEOM.n_shards())}
    for s, arrays in written.items():
        w.write_shard(s, arrays)
    every = StoreReader(tmp_path / "s.zarr").read(range(7), ("keys", "values", "indices", "cls", "images"))
    for name, got in every.items():
        if name != "labels":
            np.testing.assert_array_equal(got, np.concatenate([written[s][name] for s in range(3)]))
    codecs = json.loads((tmp_path / "s.zarr" / "keys" / "zarr.json").read_text())["codecs"]
    names = [c["name"] for c in codecs]
    assert names[-1] == "crc32c"                                 # every chunk checksummed, compressed or not
    if CODECS[codec] is None:                                    # --codec none: the bytes as they are
        assert names == ["bytes", "crc32c"]
        return
    blosc = next(c["configuration"] for c in codecs if c["name"] == "blosc")
    cname, level, shuffle, blocksize = CODECS[codec]
    assert (blosc["cname"], blosc["clevel"], blosc["shuffle"], blosc["blocksize"]) == (cname, level, shuffle,
                                                                                       blocksize)
    assert blosc["typesize"] == 2                                # fp16 keys: the shuffle's element size


def test_done_is_set_only_after_all_arrays(tmp_path, monkeypatch):
    w = open_writer(tmp_path / "s.zarr")
    arrays = shard_arrays(3, 0)
    original = type(w.group["images"]).__setitem__
    calls = []

    def failing_setitem(self, key, value):
        calls.append(self.basename)
        if self.basename == "images":
            raise OSError("disk full")
        return original(self, key, value)

    monkeypatch.setattr(type(w.group["images"]), "__setitem__", failing_setitem)
    with pytest.raises(OSError):
        w.write_shard(0, arrays)
    monkeypatch.undo()
    assert "keys" in calls and "done" not in calls
    assert not StoreReader(tmp_path / "s.zarr").done().any()
    assert w.pending_shards() == [0, 1, 2]
    w.write_shard(0, arrays)
    assert StoreReader(tmp_path / "s.zarr").done().tolist() == [True] * 3 + [False] * 4


def test_reopen_resumes_and_refuses_other_extractions(tmp_path):
    path = tmp_path / "s.zarr"
    open_writer(path).write_shard(1, shard_arrays(3, 1))
    again = open_writer(path)                                   # same identity: resume
    assert again.pending_shards() == [0, 2]
    other = json.loads(json.dumps(ATTRS))
    other["extraction"]["res"] = 128
    with pytest.raises(FptError, match="extraction.res: stored 64, requested 128"):
        open_writer(path, attrs=other)
    with pytest.raises(FptError, match="sample ids differ"):
        open_writer(path, ids=[f"t{i}" for i in range(7)])
    fresh = open_writer(path, attrs=other, overwrite=True)      # explicit overwrite starts over
    assert fresh.pending_shards() == [0, 1, 2]


def test_reopen_with_the_same_ids_in_another_order_is_refused(tmp_path):
    """Shards are written by position: a store's row i is sample ids[i]. Reopened with the same ids in another
    order (e.g. the data listed differently), the shards written would be other samples' rows, so it is not a
    resume but another extraction, refused like one with other ids."""
    path = tmp_path / "s.zarr"
    ids = [f"s{i}" for i in range(7)]
    open_writer(path, ids=ids).write_shard(0, shard_arrays(3, 0))
    assert open_writer(path, ids=ids).pending_shards() == [1, 2]           # the same order: a resume
    with pytest.raises(FptError, match="sample ids differ"):
        open_writer(path, ids=ids[::-1])
    assert StoreReader(path).ids.tolist() == ids                           # the refused open changed nothing


def test_other_schema_version_and_non_store_refused(tmp_path):
    w = open_writer(tmp_path / "s.zarr")
    w.update_attrs(fpt_store_version=99)
    with pytest.raises(FptError, match="schema version 99"):
        StoreReader(tmp_path / "s.zarr")
    with pytest.raises(FptError, match="not an fpt store"):
        StoreReader(tmp_path)


def test_incomplete_store_is_refused_for_training(tmp_path):
    open_writer(tmp_path / "s.zarr").write_shard(0, shard_arrays(3, 0))
    with pytest.raises(FptError, match="4 of 7 samples are not extracted"):
        StoreReader(tmp_path / "s.zarr").require_complete()


def test_dask_view_and_summary(tmp_path):
    w = open_writer(tmp_path / "s.zarr")
    for s in range(3):
        w.write_shard(s, shard_arrays(len(GEOM.shard_range(s)), s))
    arrays = as_dask(tmp_path / "s.zarr")
    assert arrays["keys"].chunks[0] == (3, 3, 1)                # one dask chunk per shard
    np.testing.assert_array_equal(arrays["keys"].compute(),
                                  StoreReader(tmp_path / "s.zarr").read(range(7), ("keys",))["keys"])
    s = summarize(tmp_path / "s.zarr")
    assert s["counts"] == {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}, "test": {"a": 0, "b": 2}}
    assert s["done"] == 7 and s["disk_bytes"] > 0
    keys = next(a for a in s["arrays"] if a["name"] == "keys")
    assert keys["codecs"] == ["bytes", "blosc(zstd-1,shuffle,512k)", "crc32c"] and keys["shards"] is None
    assert keys["codec_names"] == ["bytes", "blosc", "crc32c"]


def test_every_per_sample_array_has_one_chunk_per_shard(tmp_path):
    """One chunk (file) per shard and array, keys and values included (zarr's sharding copies every inner chunk
    twice on a write): damage names the shard's samples."""
    from fpt.store.verify import verify
    from tests.helpers import flip, shard_file

    path = tmp_path / "s.zarr"
    w = open_writer(path)
    for s in range(3):
        w.write_shard(s, shard_arrays(len(GEOM.shard_range(s)), s))
    chunking = {a["name"]: (a["chunks"][0], a["shards"]) for a in summarize(path)["arrays"]}
    assert all(chunking[name] == (3, None) for name in
               ("keys", "values", "indices", "cls", "images", "labels", "split", "ids", "done"))
    flip(shard_file(path, "images", 1), 40)
    flip(shard_file(path, "keys", 0), 40)
    assert sorted((p.array, tuple(p.samples)) for p in verify(path).problems) == [("images", (3, 4, 5)),
                                                                                 ("keys", (0, 1, 2))]


def test_a_shard_larger_than_the_store_is_cut_to_the_store(tmp_path):
    """--shard-size 100000000 on a few images made every array one chunk that long, which zarr fills in memory:
    gigabytes for 7 samples (a MemoryError traceback, or the machine swapping). A shard never holds more samples
    than the store."""
    from dataclasses import replace

    from fpt.store import StoreWriter

    ids = np.array([f"s{i}" for i in range(7)], dtype=object)
    w = StoreWriter.open(tmp_path / "s.zarr", replace(GEOM, samples_per_shard=10**12), ATTRS, ids=ids,
                         labels=np.array([0, 1, 0, 1, 0, 1, 1]), split=np.array([0, 0, 0, 1, 1, 2, 2]))
    assert w.geometry.samples_per_shard == 7 and w.pending_shards() == [0]
    w.write_shard(0, shard_arrays(7, 0))
    assert StoreReader(tmp_path / "s.zarr").geometry.samples_per_shard == 7 and not verify(tmp_path / "s.zarr").problems


@pytest.mark.parametrize("sharded", [("keys", "values"), "every"], ids=["kv-sharded", "every-array-sharded"])
def test_a_store_written_with_sharded_arrays_is_resumed_read_and_verified(tmp_path, monkeypatch, sharded):
    """Stores written before keep working: K/V with one sample per inner chunk (until 2026-11-27), and before that
    every per-sample array so: resumed by today's writer, read, verified, a damaged K/V chunk naming its one
    sample."""
    from fpt.store import SAMPLE_ARRAYS, verify, writer
    from tests.helpers import flip, shard_file

    sharded = SAMPLE_ARRAYS if sharded == "every" else sharded
    path = tmp_path / "s.zarr"
    written = {s: shard_arrays(len(GEOM.shard_range(s)), s) for s in range(GEOM.n_shards())}
    with monkeypatch.context() as m:
        m.setattr(writer, "SHARDED_ARRAYS", sharded)                     # the layout before
        open_writer(path).write_shard(0, written[0])
    arrays = {a["name"]: a for a in summarize(path)["arrays"]}
    assert all(arrays[name]["shards"] == ((3, *arrays[name]["shape"][1:]) if name in sharded else None)
               for name in SAMPLE_ARRAYS)
    w = open_writer(path)                                              # resumed by today's writer
    assert w.pending_shards() == [1, 2]
    for s in (1, 2):
        w.write_shard(s, written[s])
    every = StoreReader(path).read(range(7), SAMPLE_ARRAYS)
    for name in SAMPLE_ARRAYS:
        np.testing.assert_array_equal(every[name], np.concatenate([written[s][name] for s in range(3)]), err_msg=name)
    some = StoreReader(path).read([6, 0, 2], ("keys",))
    np.testing.assert_array_equal(some["keys"], every["keys"][[6, 0, 2]])
    assert verify(path).ok
    flip(shard_file(path, "keys", 1), 40)
    assert [(p.array, tuple(p.samples)) for p in verify(path).problems] == [("keys", (3,))]


def test_chunks_equal_to_the_fill_value_are_still_written(tmp_path):
    """A black image equals the images' fill value: its chunk is written anyway, so that a missing chunk or shard
    file always means lost data (verify reports it) rather than zeros that were never stored."""
    from fpt.store.verify import verify

    path = tmp_path / "s.zarr"
    w = open_writer(path)
    for s in range(2):
        arrays = shard_arrays(len(GEOM.shard_range(s)), s)
        arrays["images"][:] = 0
        w.write_shard(s, arrays)
    shard_file = path / "images" / "c" / "1" / "0" / "0" / "0"
    assert shard_file.is_file()
    assert not verify(path, ("images",)).damaged.size
    shard_file.unlink()
    assert list(verify(path, ("images",)).damaged) == [3, 4, 5]


@pytest.mark.parametrize("codec", ["zstd-1", "none"])
def test_corrupted_chunk_is_detected_by_checksum(tmp_path, codec):
    """A flipped byte fails the chunk's crc32c, compressed or not (--codec none stores the bytes as they are:
    only the checksum can tell)."""
    path = tmp_path / "s.zarr"
    w = open_writer(path, codec=codec)
    w.write_shard(0, shard_arrays(3, 0))
    shard_file = path / "keys" / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[10] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(FptError, match="cannot read 'keys'"):
        StoreReader(path).read([0], ("keys",))


def test_an_existing_non_store_is_never_replaced(tmp_path):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(FptError, match="exists and is not an fpt store"):
            open_writer(precious, overwrite=overwrite)
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_a_sample_id_that_is_not_utf8_is_refused_by_name():
    """A file name of bytes that are not UTF-8 (Python keeps them as surrogates) cannot be a stored id."""
    from fpt.store import encode_ids

    name = b"train/\xff\xfe.png".decode("utf-8", "surrogateescape")
    with pytest.raises(FptError, match=r"b'train/\\xff\\xfe.png' is not valid UTF-8"):
        encode_ids(["ok.png", name])
    assert encode_ids(["a", "bé"]).tolist() == [[97, 0, 0], [98, 195, 169]]


def test_a_damaged_array_that_every_sample_needs_is_one_error(tmp_path):
    """labels, split and ids are read whole: a chunk of them failing its checksum leaves no sample to skip."""
    path = tmp_path / "s.zarr"
    open_writer(path).write_shard(0, shard_arrays(3, 0))
    chunk = next(p for p in (path / "labels").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(FptError, match="cannot read 'labels', which every sample needs .*re-extract it"):
        StoreReader(path).labels
    summary = verify(path).summary()              # what to do: replace the store, not --repair (which refuses it)
    assert "labels is damaged" in summary and "--overwrite" in summary and "--repair" not in summary, summary


def test_a_split_emptied_by_leaving_out_corrupt_samples_says_so(tmp_path):
    path = tmp_path / "s.zarr"
    open_writer(path)
    reader = StoreReader(path)
    reader.exclude(reader.split_indices("test"))
    with pytest.raises(FptError, match="the test split is empty once its 2 corrupt samples are left out"):
        reader.split_indices("test")


def test_an_emptied_splits_message_counts_only_its_own_corrupt_samples(tmp_path):
    """The N of "the test split is empty once its N corrupt samples are left out" counts that split's samples
    left out: a corrupt sample of another split, left out as well, is not one of them."""
    path = tmp_path / "s.zarr"
    open_writer(path)
    reader = StoreReader(path)
    test = reader.split_indices("test")
    reader.exclude(reader.split_indices("train")[:1])
    reader.exclude(test)
    with pytest.raises(FptError, match=f"the test split is empty once its {len(test)} corrupt samples are left out"):
        reader.split_indices("test")


def test_a_store_edited_by_hand_is_one_error_naming_what_is_wrong(tmp_path):
    """What training, evaluation and inspect would otherwise meet as a KeyError, IndexError or a reshape error."""
    import shutil

    def edited(name, edit):
        path = tmp_path / f"{name}.zarr"
        open_writer(path).write_shard(0, shard_arrays(3, 0))
        edit(path)
        return path

    def edit_json(file, change):
        meta = json.loads(file.read_text())
        change(meta)
        file.write_text(json.dumps(meta))

    cases = {
        "the store's attributes lack extraction": lambda p: edit_json(
            p / "zarr.json", lambda m: m["attributes"].pop("extraction")),
        "the store's attributes lack backbone.name, backbone.patch_size": lambda p: edit_json(
            p / "zarr.json", lambda m: [m["attributes"]["backbone"].pop(k) for k in ("name", "patch_size")]),
        "the store's attributes lack extraction.layers": lambda p: edit_json(
            p / "zarr.json", lambda m: m["attributes"]["extraction"].pop("layers")),
        "the array 'done' is missing": lambda p: shutil.rmtree(p / "done"),
        "'keys' has the shape": lambda p: edit_json(p / "keys" / "zarr.json", lambda m: m["shape"].__setitem__(3, 99)),
        "the store names the classes ['a'], not two or more": lambda p: edit_json(
            p / "zarr.json", lambda m: m["attributes"]["dataset"].__setitem__("classes", ["a"])),
    }
    for i, (message, edit) in enumerate(cases.items()):
        path = edited(f"s{i}", edit)
        with pytest.raises(FptError, match=re.escape(message) + ".*re-extract it"):
            StoreReader(path)
    path = edited("labels", lambda p: None)
    StoreWriter.reopen(path).group["labels"][0] = 7
    with pytest.raises(FptError, match="labels run from 0 to 7, but the store names 2 classes"):
        StoreReader(path).labels
    assert summarize(edited("nodone", lambda p: shutil.rmtree(p / "done")))["done"] is None   # inspect lists it


def test_skipped_sources_of_a_resumed_extraction_are_added_to_the_report(tmp_path):
    """A resumed extraction that skips more sources adds their rows to the store's skipped-sample report, under
    its one header: the rows of the runs before stay, since they name samples still left out of every split."""
    import csv
    import io

    from fpt.store.layout import SKIPPED_REPORT

    w = open_writer(tmp_path / "s.zarr")
    first = [(1, "s1", "cannot read image s1: truncated")]
    later = [(4, "s4", 'cannot read image s4: "not a PNG", say'), (5, "s5", "cannot read image s5")]
    where = w.record_skipped(first)
    assert open_writer(tmp_path / "s.zarr").record_skipped(later) == where           # the resumed run's writer
    rows = list(csv.reader(io.StringIO((tmp_path / "s.zarr" / SKIPPED_REPORT).read_text())))
    assert rows == [["index", "id", "error"], *([str(i), name, error] for i, name, error in first + later)]


def test_an_overwrite_that_ends_with_shards_still_to_write_keeps_the_store_it_replaces(tmp_path):
    """``replacing`` removes the store an --overwrite replaces only once every shard of the new one is written:
    a block that ends without an error but with shards pending (a run that wrote some) keeps it, whole; the
    resumed --overwrite that completes the new store removes it."""
    from fpt.store.writer import REPLACED_SUFFIX

    path, kept = tmp_path / "s.zarr", tmp_path / f"s.zarr{REPLACED_SUFFIX}"
    old = open_writer(path)
    for s in range(GEOM.n_shards()):
        old.write_shard(s, shard_arrays(len(GEOM.shard_range(s)), s))
    new = open_writer(path, overwrite=True)
    with new.replacing():
        new.write_shard(0, shard_arrays(3, 10))
    assert kept.exists() and StoreReader(kept).done().all()
    assert new.pending_shards() == [1, 2]
    resumed = open_writer(path, overwrite=True)
    assert resumed.pending_shards() == [1, 2]                                # the unfinished new store, resumed
    with resumed.replacing():
        for s in resumed.pending_shards():
            resumed.write_shard(s, shard_arrays(len(GEOM.shard_range(s)), 10 + s))
    assert not kept.exists() and StoreReader(path).done().all()


def test_samples_left_out_add_up(tmp_path):
    """``exclude`` adds to the samples left out: a second call (samples found corrupt by another check) leaves
    its samples out too, and none of those of the first comes back."""
    path = tmp_path / "s.zarr"
    open_writer(path)
    reader = StoreReader(path)
    train = reader.split_indices("train")
    reader.exclude(train[:1])
    reader.exclude(train[-1:])
    np.testing.assert_array_equal(reader.split_indices("train"), train[1:-1])
