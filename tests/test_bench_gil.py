"""fpt.bench.gil: py-spy's GIL samples summed by part of a run, and the command run as it is where py-spy cannot
sample."""
import json
import shutil
import sys

import pytest

import fpt.bench.common as common
import fpt.bench.gil as gil

RUN = "<module> (fpt/bench/x.py:1);train_task (fpt/train/sweep.py:140);train (fpt/train/loop.py:186)"


def test_samples_count_for_the_part_of_a_run_their_stack_names():
    raw = "\n".join([
        f"{RUN};finish (fpt/train/loop.py:357);write_evaluation_plots (fpt/train/plots.py:60);draw (x.py:1) 30",
        f"{RUN};finish (fpt/train/loop.py:356);classification_metrics (fpt/train/metrics.py:20) 10",
        # the test's forward runs the step's code: an evaluation forward, not a training step
        f"{RUN};finish (fpt/train/loop.py:355);predict_split (fpt/train/loop.py:95);"
        "probabilities (fpt/train/step.py:300) 4",
        f"{RUN};_train (fpt/train/loop.py:205);train_epoch (fpt/train/loop.py:285);"
        "__call__ (fpt/train/step.py:290) 50",
        f"{RUN};_train (fpt/train/loop.py:205);train_epoch (fpt/train/loop.py:283);"
        "batches (fpt/train/data.py:213) 6",
        f"{RUN};_train (fpt/train/loop.py:207);json_dumps (x.py:3) 2",
        "run (threading.py:1);scheduler_loop (distributed/scheduler.py:9) 8",
        "not a sample line",
        "",
    ])
    assert gil.lock_seconds(raw, rate=100) == {
        "training step": 0.5, "pictures": 0.3, "metrics": 0.1, "outside runs": 0.08, "batch gathering": 0.06,
        "evaluation forwards": 0.04, "run, other": 0.02}


def test_without_py_spy_the_command_runs_as_it_is_and_says_it_was_not_sampled(tmp_path, monkeypatch):
    monkeypatch.setattr(gil, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(gil.shutil, "which", lambda name: None)
    flag = tmp_path / "ran"
    rc = gil.main(["--name", "t", "--", sys.executable, "-c",
                   f"import pathlib, sys; pathlib.Path({str(flag)!r}).touch(); sys.exit(3)"])
    result = json.loads((tmp_path / "gil-t.json").read_text())
    assert rc == 3 and flag.exists()
    assert result["sampled"] is False and result["why_not"] == "py-spy not on PATH" and result["lock_seconds"] is None


@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed (a lease carries it)")
def test_with_py_spy_a_busy_interpreter_is_sampled(tmp_path, monkeypatch):
    if not gil.can_sample(shutil.which("py-spy")):
        pytest.skip("py-spy cannot sample here (ptrace)")
    monkeypatch.setattr(gil, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    rc = gil.main(["--name", "busy", "--rate", "100", "--", sys.executable, "-c",
                   "import sys, time\nend = time.time() + 1.5\nwhile time.time() < end: pass\nsys.exit(3)"])
    result = json.loads((tmp_path / "gil-busy.json").read_text())
    assert rc == 3 and result["sampled"] is True                      # the command's status, not py-spy's
    assert 0.5 < result["lock_seconds"]["outside runs"] < 3
    assert (tmp_path / "gil-busy.txt").exists()
