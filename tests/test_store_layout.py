"""The store explains itself to any Zarr v3 reader: dimension names, split codes, unfinished samples, id
encoding, dask chunking, and an independent implementation (tensorstore) reading exactly what zarr-python reads."""
import json

import numpy as np
import pytest
import zarr

from fpt.store import SCHEMA_VERSION, StoreReader, as_dask
from fpt.store.layout import ARRAY_NAMES, SAMPLE_ARRAYS, decode_ids, encode_ids
from tests.helpers import GEOM, open_writer, shard_arrays


def metadata(store, name):
    return json.loads((store / name / "zarr.json").read_text())


def test_every_array_names_its_axes_and_says_what_it_holds(micro_store):
    expected = {"keys": ["sample", "layer", "head", "token", "head_dim"],
                "values": ["sample", "layer", "head", "token", "head_dim"],
                "indices": ["sample", "layer", "head", "token"], "cls": ["sample", "embed_dim"],
                "images": ["sample", "y", "x", "channel"], "labels": ["sample"], "split": ["sample"],
                "ids": ["sample", "utf8_byte"], "done": ["sample"]}
    for name in ARRAY_NAMES:
        meta = metadata(micro_store, name)
        assert meta["dimension_names"] == expected[name] and len(meta["shape"]) == len(expected[name])
        assert meta["attributes"]["description"]
    assert metadata(micro_store, "split")["attributes"]["codes"] == {
        "0": "train", "1": "val", "2": "test", "255": metadata(micro_store, "split")["attributes"]["codes"]["255"]}
    assert "class token" in metadata(micro_store, "indices")["attributes"]["description"]
    root = json.loads((micro_store / "zarr.json").read_text())["attributes"]
    assert root["fpt_store_version"] == SCHEMA_VERSION == 2
    assert root["layout"]["samples_per_shard"] == 4 and root["layout"]["split_codes"]["255"].startswith("excluded")


def test_ids_are_a_core_zarr_type_and_round_trip():
    ids = ["train/benign/001.png", "tést/ünïcode/x.png", "a", ""]
    rows = encode_ids(ids)
    assert rows.dtype == np.uint8 and rows.shape == (4, len("tést/ünïcode/x.png".encode()))
    assert decode_ids(rows) == ids
    with pytest.raises(ValueError):
        encode_ids(["bad\0id"])


def test_unfinished_samples_read_as_impossible_values(tmp_path):
    w = open_writer(tmp_path / "s.zarr")
    w.write_shard(0, shard_arrays(3, 0))
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert not np.isnan(group["keys"][:3].astype(np.float32)).any()
    assert np.isnan(group["keys"][3:].astype(np.float32)).all() and np.isnan(group["cls"][3:].astype(np.float32)).all()
    assert (group["indices"][3:] == -1).all() and not group["done"][3:].any()
    ts = pytest.importorskip("tensorstore")
    for name in ("keys", "indices"):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "s.zarr" / name)}}
        np.testing.assert_array_equal(ts.open(spec).result().read().result(), group[name][:])   # NaN == NaN here


def test_plain_dask_from_zarr_with_the_shard_chunks_is_as_dask(tmp_path):
    import dask.array as da

    w = open_writer(tmp_path / "s.zarr")
    for s in range(GEOM.n_shards()):
        w.write_shard(s, shard_arrays(len(GEOM.shard_range(s)), s))
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    ours = as_dask(tmp_path / "s.zarr")
    for name in ARRAY_NAMES:
        plain = da.from_zarr(group[name], chunks=group[name].shards or group[name].chunks)   # as the attrs say
        assert plain.chunks == ours[name].chunks
        np.testing.assert_array_equal(plain.compute(), ours[name].compute())
    assert da.from_zarr(group["keys"]).chunks[0] == (3, 3, 1)         # zarr's default, the chunk: one shard file
    assert all(ours[name].chunks[0] == (3, 3, 1) for name in (*SAMPLE_ARRAYS, "done"))    # one task per shard file


def test_tensorstore_reads_every_array_as_zarr_python_does(micro_store):
    ts = pytest.importorskip("tensorstore")
    group = zarr.open_group(micro_store, mode="r")
    for name in ARRAY_NAMES:
        array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(micro_store / name)}}).result()
        data = array.read().result()
        assert list(array.domain.labels) == metadata(micro_store, name)["dimension_names"]
        expected = group[name][:]
        assert data.dtype == expected.dtype and data.shape == expected.shape
        np.testing.assert_array_equal(data, expected)
        if name == "ids":
            assert decode_ids(data) == list(StoreReader(micro_store).ids)
            assert decode_ids(data)[0] == "train/benign/000.png"


def test_a_shard_holds_as_many_samples_as_fit_its_target_size():
    """``choose_samples_per_shard``: the most samples whose bytes stay within the target (a shard is buffered
    whole), never fewer than one however large a sample is, and capped for small samples (as this test store's)."""
    from fpt.store.layout import choose_samples_per_shard

    target = 64 << 20
    for per_sample in (3 * 2**20 + 1, 5 * 2**20 - 7, 2**20, 200_001):
        n = choose_samples_per_shard(per_sample, target)
        assert n * per_sample <= target < (n + 1) * per_sample, per_sample
    assert choose_samples_per_shard(3 * target, target) == 1
    small = choose_samples_per_shard(GEOM.bytes_per_sample(), target)
    assert small == choose_samples_per_shard(1, target) < target // GEOM.bytes_per_sample()


def test_bytes_per_sample_is_one_sample_of_every_array_as_stored(tmp_path):
    """``Geometry.bytes_per_sample`` (what sizes a store's shards and extraction's host buffers): the bytes of one
    sample's row of every array of a written store, each at its stored dtype."""
    open_writer(tmp_path / "s.zarr").write_shard(0, shard_arrays(len(GEOM.shard_range(0)), 0))
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    geometry = StoreReader(tmp_path / "s.zarr").geometry
    assert geometry.bytes_per_sample() == sum(group[name][:1].nbytes for name in ARRAY_NAMES)
