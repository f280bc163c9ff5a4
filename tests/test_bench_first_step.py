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
