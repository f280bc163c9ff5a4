"""Disk full and Ctrl-C during extraction: a clear line, nothing half-written marked done, resumable."""
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from fpt import FptError
from fpt.extract import extract
from fpt.store import StoreReader, verify
from tests.conftest import micro_config, write_image_folder
from tests.test_resume import assert_same_store


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_clear_and_resumable(tmp_path, small_disk):
    data = write_image_folder(tmp_path / "d", {"train": 24, "val": 4, "test": 4})
    store = small_disk / "s.zarr"
    cfg = micro_config(data, store, image_res=64, samples_per_shard=8)
    with pytest.raises(FptError, match="no space left on the device.*re-run the same command to resume"):
        extract(cfg)
    reader = StoreReader(store)
    done = reader.done()
    assert 0 < done.sum() < 64
    report = verify(store)
    assert not set(report.bad_samples) & set(np.flatnonzero(done))      # what is marked done reads back intact
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    assert extract(cfg).n_written == 64 - done.sum()
    clean = tmp_path / "clean.zarr"
    extract(micro_config(data, clean, image_res=64, samples_per_shard=8))
    assert_same_store(store, clean)


def test_ctrl_c_during_extraction_exits_cleanly_and_resumes(tmp_path):
    data = write_image_folder(tmp_path / "d", {"train": 14, "val": 3, "test": 3}, size=64)
    args = [sys.executable, "-m", "fpt.cli", "extract", "--data", str(data), "--backbone", "vit_tiny_patch16_224",
            "--random-init", "--res", "512", "--image-res", "32", "--device", "cpu", "--shard-size", "4",
            "--batch-size", "1", "--out", str(tmp_path / "s.zarr")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if zarr.open_group(tmp_path / "s.zarr", mode="r")["done"][:].sum() >= 4:
                break
        except Exception:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "extraction ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted" in stderr and "re-run" in stderr
    assert not (tmp_path / "s.zarr.lock").exists()                     # released on the way out
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert StoreReader(tmp_path / "s.zarr").done().all()
