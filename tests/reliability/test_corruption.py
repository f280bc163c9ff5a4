"""A damaged store is detected and explained, never trained on silently and never a traceback."""
import importlib
import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fpt import FptError
from fpt.store import StoreReader, verify
from tests.helpers import flip, run, shard_file
from tests.reliability.fuzzing import fuzz_settings

def test_flipped_bytes_in_keys_are_named_by_the_samples_of_their_chunk(micro_store, monkeypatch):
    verify_module = importlib.import_module("fpt.store.verify")    # (the package's `verify` is the function)
    assert verify(micro_store).ids is None                          # nothing to name: the ids are not read
    flip(shard_file(micro_store, "keys", 1), 40)                    # shard 1's one chunk: samples 4-7
    report = verify(micro_store)
    assert [(p.array, p.samples) for p in report.problems] == [("keys", [4, 5, 6, 7])]
    ids = StoreReader(micro_store).ids
    assert report.named([4, 7]) == [ids[4], ids[7]]
    result = run(["store", "verify", str(micro_store)])
    assert result.exit_code == 1 and ids[4] in result.output and "checksum" in result.output
    inspect = run(["inspect", str(micro_store)])                    # a small store: every chunk checksummed
    assert inspect.exit_code == 0 and "4 samples affected" in inspect.output and ids[4] in inspect.output
    monkeypatch.setattr(verify_module, "CHECKSUM_BELOW_BYTES", 1)   # as if it were large: files and metadata only
    assert verify(micro_store, full=None).ok
    assert "pass --verify to checksum" in run(["inspect", str(micro_store)]).output
    assert "4 samples affected" in run(["inspect", str(micro_store), "--verify"]).output


def test_deleted_shard_is_reported(micro_store):
    shard_file(micro_store, "values", 2).unlink()
    report = verify(micro_store, full=False)                        # even the quick check sees it
    assert [(p.array, p.samples, p.reason) for p in report.problems] == [("values", [8, 9, 10, 11],
                                                                          "shard file missing")]
    assert run(["store", "verify", str(micro_store)]).exit_code == 1


def test_truncated_metadata(micro_store):
    meta = micro_store / "images" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    report = verify(micro_store)
    assert report.problems[0].array == "images" and "metadata unreadable" in report.problems[0].reason
    assert len(report.bad_samples) == 16
    inspect = run(["inspect", str(micro_store)])
    assert inspect.exit_code == 0 and "16 samples affected" in inspect.output
    root = micro_store / "zarr.json"
    root.write_text(root.read_text()[:25])
    for args in (["inspect", str(micro_store)], ["store", "verify", str(micro_store)],
                 ["train", "--store", str(micro_store)]):
        result = run(args)
        assert result.exit_code == 2 and "cannot read store metadata" in result.output, result.output
        assert "Traceback" not in result.output


@fuzz_settings(15)
@given(array=st.sampled_from(["keys", "values", "indices", "cls", "images"]), shard=st.integers(0, 3),
       offset=st.integers(0, 10**6), also_truncate=st.booleans())
def test_random_damage_is_always_found_or_harmless(micro_store, tmp_path_factory, array, shard, offset,
                                                   also_truncate):
    import shutil

    store = tmp_path_factory.mktemp("fuzz") / "s.zarr"
    shutil.copytree(micro_store, store)
    path = shard_file(store, array, shard)
    flip(path, offset)
    if also_truncate:
        path.write_bytes(path.read_bytes()[: max(1, offset % path.stat().st_size)])
    report = verify(store)                                           # never raises
    reader = StoreReader(store)
    for i in range(shard * 4, shard * 4 + 4):
        try:
            value = reader.read([i], (array,))[array]
        except FptError:
            assert i in report.bad_samples                           # unreadable -> reported
            continue
        if i not in report.bad_samples:                              # readable and not reported -> intact
            original = StoreReader(micro_store).read([i], (array,))[array]
            np.testing.assert_array_equal(value, original)


def test_training_refuses_corrupt_samples_or_skips_them(micro_store, tmp_path):
    flip(shard_file(micro_store, "keys", 0), 60)                       # shard 0's chunk: 4 train images
    ids = StoreReader(micro_store).ids
    args = ["train", "--store", str(micro_store), "--side-res", "16", "--epochs", "1", "--device", "cpu",
            "--batch-size", "4"]
    refused = run([*args, "--out", str(tmp_path / "r1")])
    assert refused.exit_code == 2
    assert f"4 samples are corrupt ({', '.join(ids[:4])})" in " ".join(refused.output.split())
    assert not (tmp_path / "r1").exists()                             # refused before any work
    ok = run([*args, "--out", str(tmp_path / "r2"), "--skip-corrupt"])
    assert ok.exit_code == 0, ok.output
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert metrics["data"]["corrupt_skipped"] == list(ids[:4]) and metrics["data"]["train"] == 8 - 4


def test_a_sweep_checksums_the_store_once_and_passes_the_result_on(micro_store, tmp_path, monkeypatch):
    from fpt.config import sweep_config
    from fpt.train import sweep
    from fpt.store import verify as real_verify
    import fpt.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "verify", lambda *a, **k: calls.append(a) or real_verify(*a, **k))
    flip(shard_file(micro_store, "keys", 0), 60)
    cfg = sweep_config(micro_store, None, lr="0.001,0.01", weight_decay="0", seeds=1, scheduler="local:1",
                       out=tmp_path / "sw", side_res=16, epochs=1, batch_size=4, device="cpu", skip_corrupt=True)
    sweep.run_sweep(cfg)
    assert len(calls) == 1                                            # not once per run
    runs = list((tmp_path / "sw").rglob("metrics.json"))
    first_shard = list(StoreReader(micro_store).ids[:4])
    assert len(runs) == 2 and all(json.loads(p.read_text())["data"]["corrupt_skipped"] == first_shard
                                  for p in runs)


def test_a_corrupt_done_chunk_is_one_error_and_the_same_extract_rewrites_its_shard(micro_store, image_folder):
    """``done`` says which samples hold data: when a chunk of it fails its checksum, the commands that read it say
    so in one line with the fix, and re-running the extraction rewrites that shard (its flags last)."""
    from fpt.extract import extract
    from tests.conftest import micro_config

    flip(shard_file(micro_store, "done", 1), 0)
    for args in (["train", "--store", str(micro_store), "--device", "cpu"],
                 ["show", "--store", str(micro_store), "--sample", "0"]):
        result = run(args)
        assert result.exit_code == 2 and "cannot read 'done'" in result.output and "--repair" in result.output
        assert "Traceback" not in result.output
    assert extract(micro_config(image_folder, micro_store)).n_written == 4      # shard 1 again, whole
    assert verify(micro_store).ok


def test_verify_refuses_a_store_without_its_geometry(micro_store):
    meta = json.loads((micro_store / "zarr.json").read_text())
    del meta["attributes"]["geometry"]
    (micro_store / "zarr.json").write_text(json.dumps(meta))
    for args in (["store", "verify", str(micro_store)], ["store", "verify", str(micro_store), "--repair"]):
        result = run(args)
        assert result.exit_code == 2 and "attributes lack geometry" in result.output, result.output
