"""The fpt command: bad input gets one clear line and exit code 2, never a traceback; the demo shows FPT+."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fpt import FptError, cli
from fpt.cli import app
from fpt.store import StoreReader
from tests.conftest import write_image_folder
from tests.helpers import MICRO_ARGS, fails_cleanly, runner


def test_missing_and_unknown_data(tmp_path, monkeypatch):
    monkeypatch.delenv("FPT_DATA_CMMD", raising=False)
    fails_cleanly(["extract", "--data", str(tmp_path / "nope")], "does not exist")
    fails_cleanly(["extract", "--dataset", "cmmd"], "pass --data PATH or set FPT_DATA_CMMD=PATH")
    fails_cleanly(["extract", "--dataset", "nosuch"], "unknown dataset 'nosuch'")
    fails_cleanly(["extract"], "give --dataset NAME")
    fails_cleanly(["extract", "--dataset", "demo", "--writers", "fibres"],
                  "--writers 'fibres': choose one of auto, threads, processes")
    fails_cleanly(["extract", "--dataset", "demo", "--precision", "fp8"],
                  "--precision 'fp8': choose one of auto, bf16, fp16, fp32")


def test_empty_split_and_bad_res(tmp_path):
    data = write_image_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 0})
    fails_cleanly(["extract", "--data", str(data), *MICRO_ARGS], "the test split")
    data = write_image_folder(tmp_path / "e")
    fails_cleanly(["extract", "--data", str(data), *MICRO_ARGS, "--res", "60"], "not a multiple of the patch size")
    fails_cleanly(["extract", "--data", str(data), *MICRO_ARGS, "--token-ratio", "1.5"], "must be in (0, 1]")
    fails_cleanly(["extract", "--data", str(data), *MICRO_ARGS, "--layers", "2-9"], "has layers 0-3")


def test_corrupt_image_is_named_and_written_shards_survive(tmp_path):
    data = write_image_folder(tmp_path / "d")
    bad = data / "test" / "malignant" / "001.png"
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    store = tmp_path / "s.zarr"
    fails_cleanly(["extract", "--data", str(data), *MICRO_ARGS, "--out", str(store)], f"cannot read image {bad}")
    assert StoreReader(store).done().sum() == 12            # the shards before the bad image stay done
    bad.write_bytes(good)
    result = runner.invoke(app, ["extract", "--data", str(data), *MICRO_ARGS, "--out", str(store)])
    assert result.exit_code == 0, result.output
    assert "wrote 4 samples" in result.output and StoreReader(store).done().all()
    assert "limited this run" in result.output                # which stage the run waited for


def test_store_problems(tmp_path, micro_store):
    fails_cleanly(["inspect", str(tmp_path)], "is not an fpt store")
    fails_cleanly(["inspect", str(micro_store / "keys")], "is one array of a store, not a store")
    fails_cleanly(["train", "--store", str(micro_store), "--side-res", "12", "--out", str(tmp_path / "r")],
                  "not a multiple of the patch size 8")
    fails_cleanly(["train", "--store", str(micro_store), "--side-res", "16", "--device", "cpu", "--cuda-graph", "--out",
                   str(tmp_path / "g")], "--cuda-graph needs a CUDA device (this run's device is cpu)")
    assert not (tmp_path / "g").exists()                       # refused before the run wrote anything
    meta = json.loads((micro_store / "zarr.json").read_text())
    meta["attributes"]["fpt_store_version"] = 0
    (micro_store / "zarr.json").write_text(json.dumps(meta))
    fails_cleanly(["train", "--store", str(micro_store)], "store schema version 0")


def test_what_the_system_refuses_is_one_line(tmp_path, micro_store):
    """An OSError the command meets (here a file where the run's folder goes) is one line, not a traceback."""
    taken = tmp_path / "precious.txt"
    taken.write_text("keep")
    fails_cleanly(["train", "--store", str(micro_store), "--side-res", "16", "--device", "cpu", "--batch-size", "4",
                   "--out", str(taken)],
                  f"File exists: {taken}")
    assert taken.read_text() == "keep"


def test_a_bad_pipelines_file_leaves_help_and_version_working(tmp_path):
    """$FPT_PIPELINES is read by the commands that use it (one error line there), not when fpt starts."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [1\n")
    env = {**os.environ, "FPT_PIPELINES": str(bad)}
    for args in (["--version"], ["train", "--help"]):
        done = subprocess.run([sys.executable, "-m", "fpt.cli", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "fpt.cli", "extract", "--dataset", "demo"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"pipelines file {bad}: not readable YAML" in " ".join(done.stderr.split())


def test_evaluate_mismatched_checkpoint(tmp_path, micro_store, image_folder):
    run = tmp_path / "run"
    ok = runner.invoke(app, ["train", "--store", str(micro_store), "--out", str(run), "--side-res", "16",
                             "--epochs", "1", "--device", "cpu", "--batch-size", "4"])
    assert ok.exit_code == 0, ok.output
    other = tmp_path / "o.zarr"
    assert runner.invoke(app, ["extract", "--data", str(image_folder), *MICRO_ARGS, "--out", str(other),
                               "--importance", "cls"]).exit_code == 0
    fails_cleanly(["evaluate", "--store", str(other), "--checkpoint", str(run / "best.pt")],
                  "trained on another store")
    fails_cleanly(["evaluate", "--store", str(micro_store), "--checkpoint", str(tmp_path / "none.pt")],
                  "no such file")
    fails_cleanly(["evaluate", "--store", str(micro_store), "--checkpoint", str(run / "best.pt"), "--split", "x"],
                  "--split 'x': choose train, val or test")


def test_inspect_shows_the_store(micro_store, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 160)
    result = runner.invoke(app, ["inspect", str(micro_store)])
    assert result.exit_code == 0, result.output
    for text in ("schema version", "fpt_test_vit_micro_patch8", "k=13", "fp32 arithmetic", "16/16 samples", "keys",
                 "crc32c", "--codec zstd-1: blosc(zstd-1,shuffle,512k) + crc32c", "16 samples in", "on cpu"):
        assert text in result.output
    limited_by = StoreReader(micro_store).attrs["last_run"]["limited_by"]
    assert limited_by in ("decoding", "writing", "model") and f"limited by {limited_by}" in result.output
    assert "JPEG 2000 decoded reduced" not in result.output           # said only of a --j2k-decode reduced store
    as_json = runner.invoke(app, ["inspect", str(micro_store), "--json"])
    assert json.loads(as_json.output)["counts"]["train"] == {"benign": 4, "malignant": 4}


def test_codec_none_stores_the_same_features_uncompressed(tmp_path, image_folder, monkeypatch):
    """``--codec none``: the same extraction as the default codec's store, sample for sample, with chunks of the
    raw bytes (each checksummed), and inspect names it."""
    out, compressed = tmp_path / "raw.zarr", tmp_path / "default.zarr"
    for path, codec in ((out, ["--codec", "none"]), (compressed, [])):
        result = runner.invoke(app, ["extract", "--data", str(image_folder), *MICRO_ARGS, "--out", str(path), *codec])
        assert result.exit_code == 0, result.output
    names = ("keys", "values", "indices", "cls", "images")
    raw, default = StoreReader(out), StoreReader(compressed)
    n = raw.geometry.n_samples
    for name, got in raw.read(range(n), names).items():
        np.testing.assert_array_equal(got, default.read(range(n), names)[name])
    assert out.joinpath("keys", "zarr.json").read_text().count('"blosc"') == 0
    keys_bytes = sum(f.stat().st_size for f in (out / "keys").rglob("*") if f.name != "zarr.json")
    assert keys_bytes >= raw.group["keys"].nbytes                    # nothing compressed: every byte is there
    monkeypatch.setattr(cli.console, "width", 160)
    assert "--codec none: crc32c" in runner.invoke(app, ["inspect", str(out)]).output


def test_demo_shows_fpt_plus_reading_what_the_side_network_cannot_see(tmp_path):
    """The real console script, end to end (short training): FPT+ separates the classes, side-only cannot."""
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "fpt.cli", "demo", "--out-dir", str(tmp_path), "--epochs", "4"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
            for p in (tmp_path / "runs").glob("*/metrics.json")}
    assert runs["fpt+"]["test"]["auc"] > 0.9
    assert runs["side-only"]["test"]["auc"] < 0.75
    assert "fpt+" in proc.stdout and "side-only" in proc.stdout


def test_counts_out_of_range_are_refused_before_any_work(tmp_path, image_folder):
    from fpt.predict import predict_images
    from fpt.train.show import show

    out = tmp_path / "s.zarr"
    fails_cleanly(["extract", "--data", str(image_folder), *MICRO_ARGS, "--out", str(out), "--workers", "-1"],
                  "--workers and --shard-size must not be negative")
    fails_cleanly(["extract", "--data", str(image_folder), *MICRO_ARGS, "--out", str(out), "--shard-size", "-5"],
                  "--workers and --shard-size must not be negative")
    assert not out.exists()                                     # no stub store left behind
    for batch_size in (0, -3):
        with pytest.raises(FptError, match=f"--batch-size {batch_size}: must be at least 1"):
            predict_images(tmp_path / "best.pt", [image_folder], batch_size=batch_size)
    for tile in (16, 100_000):
        with pytest.raises(FptError, match=f"--tile {tile}: from 32 to 2048 px"):
            show(out, "0", tile=tile)


def test_resume_refuses_options_that_would_change_the_run(tmp_path):
    """--resume continues a run with the settings it was started with: an option that would change them is
    refused by name rather than silently ignored; runtime options (device, cache, ...) are allowed."""
    fails_cleanly(["train", "--resume", str(tmp_path / "run"), "--lr", "0.5", "--store", "x.zarr"],
                  "drop --store, --lr (a run with other settings is a new run: --out)")
    fails_cleanly(["train", "--resume", str(tmp_path / "run"), "--device", "cpu", "--ft-memory-mb", "2000"],
                  "no unfinished run there")


def test_zarr_reads_abandoned_after_a_failed_chunk_are_not_reported_as_asyncio_noise():
    """After a corrupt chunk, zarr's other pending reads are collected with asyncio's "Task was destroyed but it
    is pending!" (1 in 3 runs of `fpt store verify` on a damaged store): the command silences that logger."""
    import logging

    assert logging.getLogger("asyncio").getEffectiveLevel() > logging.ERROR


def test_a_bad_scheduler_address_is_refused_before_a_store_is_made(tmp_path, image_folder):
    out = tmp_path / "s.zarr"
    fails_cleanly(["extract", "--data", str(image_folder), *MICRO_ARGS, "--out", str(out), "--scheduler", "bogus"],
                  "--scheduler bogus: not a dask scheduler address (missing port number")
    assert not out.exists()


def test_demo_refuses_zero_epochs_before_extracting(tmp_path):
    result = runner.invoke(app, ["demo", "--epochs", "0", "--out-dir", str(tmp_path / "demo")])
    assert result.exit_code == 2 and "--epochs" in result.output and not (tmp_path / "demo").exists()


def test_the_metrics_table_shows_each_metric_under_its_own_name(monkeypatch):
    """``show_metrics``: each column of a run's row holds the test metric its header names (distinct values
    here, so a value under another's header shows), and PME only where a run has one."""
    from fpt.train.results import RunMetrics, Throughput

    shown = []
    monkeypatch.setattr(cli.console, "print", lambda *args, **kwargs: shown.append(args[0]))
    test = {"auc": 0.9123, "acc": 0.8234, "f1": 0.7345, "kappa": 0.6456}
    run = RunMetrics(method="fpt+", best_epoch=3, best_reason="highest val AUC", val=test, test=test,
                     params={"ratio_percent": 1.234}, efficiency={"ppe": 0.5567, "pme": None},
                     throughput=Throughput(123.0, 130.0, 456.0, "cpu_peak_rss", 100.0, "cpu", False, False, 2),
                     data={}, config={}, store="s.zarr", run_dir="runs/x")
    cli.show_metrics([run])
    columns = {c.header: [str(cell) for cell in c.cells] for c in shown[0].columns}
    assert "PME" not in columns
    for header, name in (("AUC", "auc"), ("acc", "acc"), ("F1", "f1"), ("kappa", "kappa")):
        assert columns[header] == [f"{test[name]:.3f}"], header
    assert columns["PPE"] == [f"{run.efficiency['ppe']:.3f}"] and columns["method"] == [run.method]


def test_user_text_in_a_message_is_printed_as_written(tmp_path, micro_store):
    """Paths, ids and names are the user's: rich markup or emoji codes in them print as they are, never as
    styles, pictures or a MarkupError traceback (``[/]`` closes nothing)."""
    for name in ("[/]x.zarr", "a[bold]b:smile:.zarr"):
        fails_cleanly(["inspect", str(tmp_path / name)], f"{name} does not exist")
    fails_cleanly(["train", "--store", str(micro_store), "--device", "foo"], "--device 'foo': choose auto, cpu")
