"""Disk full and Ctrl-C during extraction: a clear line, nothing half-written marked done, resumable."""
import signal
import subprocess

import numpy as np
import pytest

from fpt import FptError
from fpt.extract import extract
from fpt.store import StoreReader, verify
from tests.conftest import micro_config, write_image_folder
from tests.helpers import assert_same_store, cli, interrupt_after_first_shard, slow_extraction


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of ``request.param`` (600k unless parametrized; root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = getattr(request, "param", "600k")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("small_disk, image_res, direct", [("600k", 64, False), ("3m", 256, True)],
                         indirect=["small_disk"], ids=["small-files", "direct-writes"])
def test_disk_full_is_clear_and_resumable(tmp_path, small_disk, image_res, direct):
    """Also when the disk fills during a write past the page cache (``direct-writes``: the low-res images' shard
    files, 1.5 MB, written with O_DIRECT where this tmpfs takes it)."""
    from fpt.store.direct_io import write_direct

    if direct and not write_direct(small_disk / "probe", memoryview(b"x")):
        pytest.skip("this tmpfs refuses O_DIRECT")
    (small_disk / "probe").unlink(missing_ok=True)
    data = write_image_folder(tmp_path / "d", {"train": 24, "val": 4, "test": 4})
    store = small_disk / "s.zarr"
    cfg = micro_config(data, store, image_res=image_res, samples_per_shard=8)
    with pytest.raises(FptError, match="no space left on the device.*re-run the same command to resume"):
        extract(cfg)
    reader = StoreReader(store)
    done = reader.done()
    assert 0 < done.sum() < 64
    report = verify(store)
    assert not set(report.bad_samples) & set(np.flatnonzero(done))      # what is marked done reads back intact
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    assert extract(cfg).n_written == 64 - done.sum()
    clean = tmp_path / "clean.zarr"
    extract(micro_config(data, clean, image_res=image_res, samples_per_shard=8))
    assert_same_store(store, clean)


def test_ctrl_c_during_extraction_exits_cleanly_and_resumes(tmp_path):
    options, _ = slow_extraction(tmp_path)
    args = cli(*options, "--out", tmp_path / "s.zarr")
    returncode, stderr = interrupt_after_first_shard(args, tmp_path / "s.zarr", signal.SIGINT)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted" in stderr and "re-run" in stderr
    assert not (tmp_path / "s.zarr.lock").exists()                     # released on the way out
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert StoreReader(tmp_path / "s.zarr").done().all()


def test_ctrl_c_during_training_resumes_with_resume(micro_store, tmp_path, monkeypatch):
    """Ctrl-C after the second epoch, then `fpt train --resume RUN` gives the uninterrupted result."""
    import json

    from typer.testing import CliRunner

    from fpt.cli import app
    from fpt.train import files

    runner = CliRunner()
    args = ["train", "--store", str(micro_store), "--side-res", "16", "--epochs", "4", "--device", "cpu",
            "--prompts", "2", "--batch-size", "4", "--checkpoint-seconds", "0"]
    real_save = files.save_checkpoint
    saves = []

    def interrupt_after_two_epochs(path, kind, content):
        real_save(path, kind, content)
        if path.name == "last.pt":
            saves.append(content["epoch"])
            if content["epoch"] == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_checkpoint", interrupt_after_two_epochs)
    stopped = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert stopped.exit_code == 130 and "re-run" in stopped.output
    monkeypatch.setattr(files, "save_checkpoint", real_save)
    resumed = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    assert resumed.exit_code == 0, resumed.output
    straight = runner.invoke(app, [*args, "--out", str(tmp_path / "straight")])
    assert straight.exit_code == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("run", "straight"))
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"] and a["data"]["resumed_from_epoch"] == 1
    again = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    assert again.exit_code == 2 and "finished already" in again.output
