"""fpt.bench.first_step: every first use of a fresh process's first LPM step timed, one fresh process per res."""
import json

from fpt.bench import common, first_step

STAGES = ("import", "context", "build", "patch_embed", "block", "lse_attention", "importance", "first_step",
          "low_res_copy", "second_step")


def test_each_res_is_measured_in_a_process_of_its_own_with_every_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    first_step.main(["--model", "vit_tiny_patch16_224", "--res", "32:1", "64:2", "--device", "cpu"])
    rows = json.loads((tmp_path / "first_step-cpu.json").read_text())["cases"]
    assert [(r["res"], r["batch"]) for r in rows] == [(32, 1), (64, 2)]
    for row in rows:
        assert all(row[f"{stage}_s"] >= 0 for stage in STAGES)
        assert row["import_s"] > 0.1          # a fresh process imports torch: not the test's own, already loaded


def test_beside_busy_helpers_each_count_and_niceness_is_a_row_and_alone_is_measured_once(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    first_step.main(["--model", "vit_tiny_patch16_224", "--res", "32:1", "--device", "cpu", "--busy-helpers", "0", "1",
                     "--helper-niceness", "0", "3"])
    rows = json.loads((tmp_path / "first_step-cpu.json").read_text())["cases"]
    assert [(r["busy_helpers"], r["helper_niceness"]) for r in rows] == [(0, 0), (1, 0), (1, 3)]
    assert all(row[f"{stage}_s"] >= 0 for row in rows for stage in STAGES)


def test_busy_helpers_run_at_the_niceness_asked_until_the_block_ends():
    import os
    import time

    import psutil

    own = os.nice(0)
    with first_step.busy_helpers(2, 3) as pids:
        helpers = [psutil.Process(pid) for pid in pids]
        deadline = time.monotonic() + 30
        while {h.nice() for h in helpers} != {min(own + 3, 19)} and time.monotonic() < deadline:
            time.sleep(0.05)                    # each lowers its own priority as it starts
        assert {h.nice() for h in helpers} == {min(own + 3, 19)}
        assert all(h.is_running() for h in helpers)
    assert not any(h.is_running() for h in helpers) and os.nice(0) == own
