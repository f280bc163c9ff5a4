"""Stores at fsspec URLs: an in-memory filesystem and a real S3 API (moto's server, reached over HTTP by the
test process and by dask worker processes alike) behave like local stores for extract, train, inspect, verify
and the lock."""
import json
import os
import time

import pytest

from fpt import FptError
from fpt.cli import app
from fpt.config import extract_config, sweep_config
from fpt.extract import extract
from fpt.store import StoreLocation, StoreLock, StoreReader, summarize, verify
from fpt.store import lock as lock_module
from fpt.train.sweep import run_sweep
from tests.conftest import micro_config, write_image_folder
from tests.helpers import DASK_CASE, assert_same_store, dask_case_single_process, runner


@pytest.fixture(scope="module")
def s3():
    """A bucket on a local S3 server: (s3fs filesystem, bucket URL)."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            env.setenv(key, value)         # also inherited by the dask worker processes the tests start
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("fpt-test")
        yield fs, "s3://fpt-test"
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def memory_url(request):
    """A fresh memory:// prefix, removed afterwards."""
    from fsspec.implementations.memory import MemoryFileSystem

    url = f"memory://fpt-{request.node.name}-{time.time_ns()}"
    yield url
    MemoryFileSystem().rm(url.removeprefix("memory://"), recursive=True) if MemoryFileSystem().exists(
        url.removeprefix("memory://")) else None


def test_locations_parse_paths_and_urls(tmp_path):
    local = StoreLocation(tmp_path / "a.zarr")
    assert local.local == tmp_path / "a.zarr" and local.name == "a.zarr"
    as_url = StoreLocation(f"file://{tmp_path}/a.zarr")
    assert as_url.local == tmp_path / "a.zarr"            # file:// is the local filesystem: flock, LocalStore
    remote = StoreLocation("memory://bucket/x/cmmd.zarr/")
    assert remote.local is None and remote.name == "cmmd.zarr" and str(remote) == "memory://bucket/x/cmmd.zarr"
    with pytest.raises(FptError, match="nosuchproto://x.zarr: cannot open this URL"):
        StoreLocation("nosuchproto://x.zarr")


def test_a_location_opens_its_filesystem_anew_in_a_forked_process(memory_url):
    """Object-store clients are not fork-safe: a location that travelled into a forked process (a DataLoader
    worker, a dask worker) opens its filesystem again there rather than using the parent's client."""
    location = StoreLocation(f"{memory_url}/s.zarr")
    inherited = location.fs
    assert location.fs is inherited                                     # kept within one process
    child = os.fork()
    if child == 0:                                                      # the forked process: report, leave at once
        code = 1
        try:
            code = 0 if location.fs is not inherited and location.fs is location.fs else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert location.fs is inherited


def test_memory_url_store_equals_local_store_and_trains(tmp_path, image_folder, memory_url):
    url = f"{memory_url}/micro.zarr"
    extract(micro_config(image_folder, url))
    extract(micro_config(image_folder, tmp_path / "local.zarr"))
    assert_same_store(url, tmp_path / "local.zarr")
    location = StoreLocation(url)
    assert location.exists() and not location.fs.exists(location.sibling(".lock"))   # the lease beside it: released

    again = extract(micro_config(image_folder, url))                    # complete: nothing to do
    assert again.n_written == 0
    s = summarize(url)
    assert s["done"] == s["n_samples"] == summarize(tmp_path / "local.zarr")["n_samples"]
    assert s["path"] == url and s["disk_bytes"] > 0
    assert verify(url).ok
    reader = StoreReader(url)
    assert reader.read(reader.split_indices("train")[:2])["keys"].shape[0] == 2

    result = runner.invoke(app, ["train", "--store", url, "--epochs", "1", "--device", "cpu", "--side-res", "32",
                                 "--batch-size", "4", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["store"] == url and 0 <= metrics["test"]["auc"] <= 1


def test_url_store_refusals_match_local_ones(tmp_path, image_folder, memory_url):
    url = f"{memory_url}/s.zarr"
    extract(micro_config(image_folder, url))
    with pytest.raises(FptError, match="holds a different extraction"):
        extract(micro_config(image_folder, url, token_ratio=0.5))
    extract(micro_config(image_folder, url, token_ratio=0.5, overwrite=True))     # --overwrite replaces it
    assert StoreReader(url).attrs["extraction"]["token_ratio"] == 0.5

    other = StoreLocation(f"{memory_url}/not-a-store")
    other.write_bytes("notes.txt", b"keep me")
    with pytest.raises(FptError, match="is not an fpt store"):
        extract(micro_config(image_folder, str(other), overwrite=True))
    assert other.read_bytes("notes.txt") == b"keep me"                  # never deleted
    with pytest.raises(FptError, match="missing.zarr does not exist"):
        StoreReader(f"{memory_url}/missing.zarr")


def test_lease_lock_names_the_holder_and_takes_over_a_stale_lease(memory_url, monkeypatch):
    monkeypatch.setattr(lock_module, "SETTLE_S", 0.0)
    store = f"{memory_url}/s.zarr"
    location = StoreLocation(store)
    with StoreLock(store):
        lease = json.loads(location.fs.cat_file(location.sibling(".lock")))
        assert lease["pid"] == os.getpid() and lease["token"]
        with pytest.raises(FptError, match=f"being extracted by pid {os.getpid()} on .*lease renewed 0 s ago"):
            with StoreLock(store):
                pass
    assert not location.fs.exists(location.sibling(".lock"))           # released

    dead = {"pid": 99999, "host": "gone", "since": "2026-01-01T00:00:00", "token": "old",
            "renewed": time.time() - lock_module.LEASE_S - 1}
    location.fs.pipe_file(location.sibling(".lock"), json.dumps(dead).encode())
    with StoreLock(store):                                              # stale: taken over
        assert json.loads(location.fs.cat_file(location.sibling(".lock")))["pid"] == os.getpid()


def test_lease_lock_renews_and_loses_to_a_rival_that_wrote_last(memory_url, monkeypatch):
    monkeypatch.setattr(lock_module, "SETTLE_S", 0.0)
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    store = f"{memory_url}/s.zarr"
    location = StoreLocation(store)
    with StoreLock(store):
        first = json.loads(location.fs.cat_file(location.sibling(".lock")))["renewed"]
        time.sleep(0.3)
        assert json.loads(location.fs.cat_file(location.sibling(".lock")))["renewed"] > first
        taker = {"pid": 7, "host": "taker", "since": "now", "token": "taker", "renewed": time.time()}
        location.fs.pipe_file(location.sibling(".lock"), json.dumps(taker).encode())   # took a lapsed lease
        time.sleep(0.3)
        assert json.loads(location.fs.cat_file(location.sibling(".lock")))["token"] == "taker"  # not renewed over
    assert location.fs.exists(location.sibling(".lock"))                  # and not removed on release
    location.fs.rm_file(location.sibling(".lock"))

    rival = {"pid": 4242, "host": "rival", "since": "now", "token": "rival", "renewed": time.time()}
    real_write = lock_module._LeaseLock._write

    def write_then_rival_overwrites(self):
        real_write(self)
        location.fs.pipe_file(location.sibling(".lock"), json.dumps(rival).encode())

    monkeypatch.setattr(lock_module._LeaseLock, "_write", write_then_rival_overwrites)
    with pytest.raises(FptError, match="pid 4242 on rival"):
        with StoreLock(store):
            pass
    assert json.loads(location.fs.cat_file(location.sibling(".lock")))["token"] == "rival"   # left to its holder


def test_s3_store_from_a_dask_cluster_equals_a_local_store(tmp_path, s3):
    fs, bucket = s3
    data, single = dask_case_single_process(tmp_path)
    url = f"{bucket}/dask.zarr"
    result = extract(extract_config(None, data, out=url, **DASK_CASE), scheduler="local:2")
    assert result.n_written == 20
    assert_same_store(url, single)
    assert fs.isfile("fpt-test/dask.zarr/keys/c/0/0/0/0/0") and not fs.exists("fpt-test/dask.zarr.lock")

    inspected = runner.invoke(app, ["inspect", url])
    assert inspected.exit_code == 0 and "20/20 samples" in inspected.output, inspected.output
    trained = runner.invoke(app, ["train", "--store", url, "--epochs", "1", "--device", "cpu", "--side-res", "32",
                                  "--batch-size", "4", "--cache", "none", "--workers", "2",   # forked readers
                                  "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    swept = run_sweep(sweep_config(url, lr="1e-3", weight_decay="0", seeds=1, scheduler="local:1",
                                   out=tmp_path / "sweep", cache="none", side_res=16, epochs=1, batch_size=4,
                                   device="cpu"))                       # a worker process streams from S3
    assert swept.ran == 1 and (tmp_path / "sweep" / "runs" / "lr0.001-wd0-seed0" / "best.pt").exists()

    key = "fpt-test/dask.zarr/values/c/1/0/0/0/0"                       # shard 1: samples 3-5
    damaged = bytearray(fs.cat_file(key))
    damaged[len(damaged) // 3] ^= 0xFF
    fs.pipe_file(key, bytes(damaged))
    report = verify(url)
    assert not report.ok and set(report.bad_samples) <= {3, 4, 5} and len(report.bad_samples) >= 1
    verified = runner.invoke(app, ["store", "verify", url])
    bad_id = StoreReader(url).ids[report.bad_samples[0]]
    assert verified.exit_code == 1 and bad_id in verified.output, verified.output


def test_skipped_report_is_written_on_an_object_store(tmp_path, s3):
    fs, bucket = s3
    data = write_image_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    broken = sorted((data / "train" / "benign").iterdir())[0]
    broken.write_bytes(b"not an image")
    url = f"{bucket}/skipped.zarr"
    result = extract(micro_config(data, url, on_error="skip"))
    assert result.n_skipped == 1 and result.skipped_report == f"{url}/skipped.csv"
    rows = fs.cat_file("fpt-test/skipped.zarr/skipped.csv").decode().splitlines()
    assert rows[0] == "index,id,error" and "train/benign/" in rows[1] and len(rows) == 2
    assert (StoreReader(url).split == 255).sum() == 1


def test_unreachable_and_unknown_urls_are_one_line_errors(tmp_path):
    result = runner.invoke(app, ["inspect", "nosuchproto://bucket/x.zarr"])
    assert result.exit_code == 2 and "cannot open this URL" in result.output, result.output
    result = runner.invoke(app, ["train", "--store", "memory://nothing-here/x.zarr"])
    assert result.exit_code == 2 and "x.zarr does not exist" in result.output, result.output


def test_an_unreachable_object_store_is_one_line(tmp_path, s3, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")       # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        result = runner.invoke(app, ["inspect", "s3://fpt-test/x.zarr"])
        assert result.exit_code == 2 and "cannot reach the store" in result.output, result.output
        data = write_image_folder(tmp_path / "d", {"train": 1, "val": 1, "test": 1})
        with pytest.raises(FptError, match="cannot reach the store"):
            extract(micro_config(data, "s3://fpt-test/x.zarr"))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_an_object_store_write_failure_mid_run_keeps_finished_shards(tmp_path, memory_url, monkeypatch):
    from fpt.store import StoreWriter

    data = write_image_folder(tmp_path / "d", {"train": 4, "val": 2, "test": 2})
    url = f"{memory_url}/s.zarr"
    real_write_shard, calls = StoreWriter.write_shard, []

    def denied_on_third_shard(self, shard, arrays, excluded=()):
        calls.append(shard)
        if len(calls) == 3:
            raise PermissionError("Access Denied")
        real_write_shard(self, shard, arrays, excluded)

    monkeypatch.setattr(StoreWriter, "write_shard", denied_on_third_shard)
    with pytest.raises(FptError, match="writing to .* failed .*Access Denied.* re-run the same command"):
        extract(micro_config(data, url))
    assert StoreReader(url).done().sum() == 8                           # the two finished shards
    monkeypatch.setattr(StoreWriter, "write_shard", real_write_shard)
    assert extract(micro_config(data, url)).n_written == StoreReader(url).geometry.n_samples - 8
    assert StoreReader(url).done().all()


def test_a_local_store_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    def denied(self, path, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(LocalFileSystem, "info", denied)       # tests run as root, so chmod would not deny
    result = runner.invoke(app, ["inspect", str(tmp_path / "a.zarr")])
    assert result.exit_code == 2 and "cannot read the store (PermissionError" in result.output, result.output


def test_overwrite_on_an_object_store_keeps_the_old_store_beside_it_there_and_then_removes_it(tmp_path, s3,
                                                                                              memory_url):
    """The store an --overwrite replaces goes to ``<store>.replaced`` on the store's own filesystem (not to a
    local path named like the bucket), and is removed there once the new store is complete."""
    fs, bucket = s3
    data = write_image_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    for url in (f"{bucket}/over.zarr", f"{memory_url}/over.zarr"):
        location = StoreLocation(url)
        extract(micro_config(data, url))
        extract(micro_config(data, url, token_ratio=0.5, overwrite=True))
        assert StoreReader(url).attrs["extraction"]["token_ratio"] == 0.5
        assert location.fs.exists(location.root) and not location.fs.exists(location.root + ".replaced"), url
