"""Methods on one store (fpt+, fpt, side-only, linear-probe): models against their formulas, PPE/PME against the
paper's equations and tables, one training loop for all, checkpoints that rebuild any method."""
import json
import math

import pytest
import torch

from fpt import FptError
from fpt.config import train_config
from fpt.store import StoreReader
from fpt.train import (FptFusionModule, LinearProbe, ModelSpec, SideNetwork, build_model, evaluate_checkpoint, pme,
                       ppe, train)
from fpt.train.metrics import efficiency
from fpt.train.model import FusionModule, prompt_attention
from tests.conftest import micro_config, write_image_folder
from tests.helpers import tiny_train

SPEC = dict(lpm_dim=32, lpm_heads=2, head_dim=16, patch_size=8, layers=3, n_classes=4, side_res=32, prompts=5,
            reduction=4)


# --- PPE / PME: paper eqs. 9-10, checked against the paper's own table entries --------------------------------

# (avg AUC, learnable %, memory MB, PPE, PME): Table 4 (prompts 4..128) and Table 1 (full FT, linear probing)
PAPER_ROWS = [(85.94, 0.96, 720, 85.58, 84.80), (86.39, 0.99, 722, 86.02, 85.24), (87.12, 1.03, 736, 86.73, 85.94),
              (86.54, 1.11, 812, 86.13, 85.25), (86.66, 1.28, 972, 86.18, 85.12), (86.49, 1.61, 1388, 85.89, 84.33),
              (88.82, 100, 23128, 65.73, 65.73), (83.28, 0.01, 3416, 83.28, 78.44)]
FULL_FT_MB = 23128   # paper Table 1: full fine-tuning of ViT-B at 512 px


@pytest.mark.parametrize("auc, ratio, memory, paper_ppe, paper_pme", PAPER_ROWS)
def test_ppe_and_pme_reproduce_the_paper_tables(auc, ratio, memory, paper_ppe, paper_pme):
    assert ppe(auc, ratio) == pytest.approx(paper_ppe, abs=0.006)
    assert pme(auc, memory, FULL_FT_MB) == pytest.approx(paper_pme, abs=0.006)


def test_ppe_and_pme_are_the_formulas():
    assert ppe(0.9, 2.5) == pytest.approx(0.9 * math.exp(-math.log10(0.025 + 1)))
    assert pme(0.8, 500, 2000) == pytest.approx(0.8 * math.exp(-math.log10(0.25 + 1)))
    assert ppe(0.7, 0) == 0.7 and pme(0.7, 0, 100) == 0.7
    with pytest.raises(ValueError):
        pme(0.7, 10, 0)


def test_a_results_efficiency_has_pme_only_with_its_own_memory_and_a_reference():
    """What a run and a sweep report: PPE of the score; PME when both memories are known (a sweep's mean)."""
    e = efficiency(0.8, "mean test AUC", 1.5, 300.0, 2000.0)
    assert e == {"score": "mean test AUC", "ppe": ppe(0.8, 1.5), "pme": pme(0.8, 300.0, 2000.0),
                 "ft_memory_mb": 2000.0}
    assert efficiency(0.8, "test_auc", 1.5, None, 2000.0)["pme"] is None           # runs shared one process
    assert efficiency(0.8, "test_auc", 1.5, 300.0, None)["pme"] is None            # no full fine-tuning figure
    assert efficiency(None, "test_auc", 1.5, 300.0, 2000.0) == {"score": "test_auc", "ppe": None, "pme": None,
                                                                "ft_memory_mb": 2000.0}


# --- the models ------------------------------------------------------------------------------------------------

def test_fpt_fusion_matches_the_earlier_fpt_formula():
    """FPT: q = in_proj(p) (p of the side width, no LayerNorm), CA over K/V per head, out = out_proj(CA) + p."""
    torch.manual_seed(0)
    fusion = FptFusionModule(layers=3, prompts=5, lpm_dim=32, lpm_heads=2, side_dim=8, dropout=0.0)
    keys, values = torch.randn(2, 3, 2, 7, 16), torch.randn(2, 3, 2, 7, 16)
    out = fusion(keys, values)
    assert out.shape == (2, 3, 5, 8) and fusion.prompts.shape == (3, 5, 8)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in fusion.modules())
    for b in range(2):
        for layer in range(3):
            p = fusion.prompts[layer]                                       # [P, D_side]
            q = fusion.in_proj(p)                                           # [P, D]
            heads = [torch.softmax(q[:, h * 16:(h + 1) * 16] @ keys[b, layer, h].T / 4.0, -1) @ values[b, layer, h]
                     for h in range(2)]
            expected = fusion.out_proj(torch.cat(heads, -1)) + p
            torch.testing.assert_close(out[b, layer], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion_cls", [FusionModule, FptFusionModule])
def test_prompt_attention_is_what_the_fusion_attends_with(fusion_cls):
    torch.manual_seed(1)
    fusion = fusion_cls(layers=2, prompts=4, lpm_dim=32, lpm_heads=2, side_dim=8, dropout=0.0)
    keys, values = torch.randn(3, 2, 2, 9, 16), torch.randn(3, 2, 2, 9, 16)
    weights = prompt_attention(fusion.query(), keys)                        # [B, L, H, P, k]
    assert weights.shape == (3, 2, 2, 4, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 2, 4))
    context = (weights @ values).transpose(2, 3).flatten(-2)                # [B, L, P, D]
    torch.testing.assert_close(fusion.context(keys, values), context, rtol=1e-5, atol=1e-5)


def test_fpt_side_network_uses_prompts_of_the_side_width():
    model = SideNetwork(ModelSpec(**SPEC, method="fpt")).eval()
    assert isinstance(model.fusion, FptFusionModule) and len(model.vit.blocks) == 3
    images, keys, values = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 2, 6, 16), torch.randn(2, 3, 2, 6, 16)
    logits = model(images, keys, values)
    assert logits.shape == (2, 4)
    assert not torch.allclose(logits, model(images, torch.randn_like(keys), torch.randn_like(values)))


def test_methods_resolve_and_build():
    assert ModelSpec(**{**SPEC, "prompts": 0}).method == "side-only"          # the old --prompts 0
    assert ModelSpec(**SPEC, method="side-only").prompts == 0
    probe = build_model(ModelSpec(**SPEC, method="linear-probe"))
    assert isinstance(probe, LinearProbe)
    assert sum(p.numel() for p in probe.parameters()) == 32 * 4 + 4         # the head only
    assert probe(torch.randn(5, 32)).shape == (5, 4)
    with pytest.raises(FptError, match="--method fpt needs --prompts > 0"):
        ModelSpec(**{**SPEC, "prompts": 0}, method="fpt")
    with pytest.raises(FptError, match="--method 'lora'"):
        ModelSpec(**SPEC, method="lora")


def test_train_config_methods(tmp_path):
    store = tmp_path / "s.zarr"
    assert train_config(store, None, prompts=0).method == "side-only"
    assert train_config(store, None, method="linear-probe").prompts == 0
    assert train_config(store, None).method == "fpt+" and train_config(store, None).cache == "auto"
    with pytest.raises(FptError, match="--method fpt needs --prompts > 0"):
        train_config(store, None, method="fpt", prompts=0)
    with pytest.raises(FptError, match="--method 'adapter'"):
        train_config(store, None, method="adapter")
    with pytest.raises(FptError, match="--cache 'disk'"):
        train_config(store, None, cache="disk")
    with pytest.raises(FptError, match="--ft-memory-mb"):
        train_config(store, None, ft_memory_mb=0)


# --- one loop, every method, on a store ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from fpt.extract import extract

    root = tmp_path_factory.mktemp("methods")
    out = root / "micro.zarr"
    extract(micro_config(write_image_folder(root / "data"), out))
    return out


@pytest.mark.parametrize("method", ["fpt+", "fpt", "side-only", "linear-probe"])
def test_every_method_trains_evaluates_and_reports_efficiency(store, tmp_path, method):
    started = []
    metrics = train(tiny_train(store, tmp_path / "run", method=method, ft_memory_mb=2000.0), on_start=started.append)
    # the earlier FPT on 2 of the micro LPM's 4 layers is said to be smaller than the paper's (one per LPM layer)
    assert [w.startswith("--method fpt on 2 of the LPM's 4 layers") for w in started[0]["warnings"]] == (
        [True] if method == "fpt" else [])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["method"] == method and saved["config"]["method"] == method
    lpm_params = StoreReader(store).attrs["backbone"]["published_params"]      # the LPM as published
    p = saved["params"]
    assert p["total"] == p["learnable"] + lpm_params
    if method == "linear-probe":
        assert p["learnable"] == 32 * 2 + 2                                   # D x C + C
    e, t = saved["efficiency"], saved["throughput"]
    auc = saved["test"]["auc"]
    assert e["ppe"] == pytest.approx(auc * math.exp(-math.log10(p["ratio_percent"] / 100 + 1)))
    assert e["pme"] == pytest.approx(auc * math.exp(-math.log10(t["peak_memory_mb"] / 2000.0 + 1)))
    assert t["train_samples_per_s"] > 0 and t["peak_memory_mb"] > 0 and t["memory_kind"] == "cpu_peak_rss"
    assert not (tmp_path / "run" / "last.pt").exists()
    again = evaluate_checkpoint(store, tmp_path / "run" / "best.pt", "test", device="cpu")
    assert again.method == method and again.metrics["auc"] == pytest.approx(metrics.test["auc"])


def test_without_a_full_fine_tuning_reference_there_is_no_pme(store, tmp_path):
    saved = train(tiny_train(store, tmp_path / "run", epochs=1))
    assert saved.efficiency["pme"] is None and saved.efficiency["ppe"] is not None


def test_a_run_whose_peak_memory_is_shared_has_no_pme(store, tmp_path):
    """A run whose memory block overlapped another one of this process (a sweep's runs in threads) measured the
    process's peak, not its own: no PME even with a full fine-tuning reference; the PPE as always."""
    from fpt.train.memory import PeakMemory

    with PeakMemory(torch.device("cpu")):
        saved = train(tiny_train(store, tmp_path / "run", epochs=1, ft_memory_mb=2000.0))
    assert saved.throughput.memory_kind.endswith("_shared")
    assert saved.efficiency["pme"] is None and saved.efficiency["ppe"] is not None


def test_side_only_reads_no_kv_and_probe_reads_only_cls(store, tmp_path, monkeypatch):
    from fpt.store import StoreReader

    read_names = []
    original = StoreReader.read

    def spy(reader, idx, names):
        read_names.append(tuple(names))
        return original(reader, idx, names)

    monkeypatch.setattr(StoreReader, "read", spy)
    train(tiny_train(store, tmp_path / "a", epochs=1, method="side-only"))
    assert set(read_names) == {("images",)}
    read_names.clear()
    train(tiny_train(store, tmp_path / "b", epochs=1, method="linear-probe"))
    assert set(read_names) == {("cls",)}


def test_interrupted_run_resumes_to_the_same_result(store, tmp_path):
    whole = train(tiny_train(store, tmp_path / "whole", epochs=3))

    def stop_after_first(record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_train(store, tmp_path / "cut", epochs=3), on_epoch=stop_after_first)
    assert (tmp_path / "cut" / "last.pt").exists() and not (tmp_path / "cut" / "metrics.json").exists()
    with pytest.raises(FptError, match="unfinished run with other settings \\(lr\\)"):
        train(tiny_train(store, tmp_path / "cut", epochs=3, lr=0.5))
    started = []
    resumed = train(tiny_train(store, tmp_path / "cut", epochs=3), on_start=started.append)
    assert started[0]["resumed_from_epoch"] == 0
    assert resumed.test == whole.test and resumed.val == whole.val
    assert resumed.best_epoch == whole.best_epoch
    a = torch.load(tmp_path / "whole" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("whole", "cut")]
    assert len(logs[1]) == 3 and logs[0] == logs[1]                      # same losses: same order, draws, dropout


def test_a_last_pt_whose_dropout_drew_from_the_global_generator_is_refused_and_kept(store, tmp_path):
    """Runs draw their dropout masks from a generator of their own, whose state last.pt keeps; a last.pt written
    before (torch's global generator states instead) cannot continue with the same results: refused in one line,
    and left as it is."""
    def stop_after_first(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_train(store, tmp_path / "cut", epochs=3), on_epoch=stop_after_first)
    last = tmp_path / "cut" / "last.pt"
    content = torch.load(last, weights_only=True)
    assert set(content["rng"]) == {"numpy", "augment", "dropout"}
    content["rng"] = {"numpy": content["rng"]["numpy"], "augment": content["rng"]["augment"],
                      "torch": torch.get_rng_state(), "cuda": None}               # as fpt wrote it before
    torch.save(content, last)
    before = last.read_bytes()
    with pytest.raises(FptError, match="earlier fpt whose dropout drew from torch's global generator"):
        train(tiny_train(store, tmp_path / "cut", epochs=3))
    assert last.read_bytes() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_interrupted_captured_cuda_run_resumes_to_the_same_result(store, tmp_path):
    """On CUDA the step is captured after its eager warm-up steps, and a resumed run warms up and captures again:
    the same losses (the replayed kernels are the eager ones, dropout's draws come from the same generator
    offsets) and the same selected model as the uninterrupted run."""
    def run(out, **kw):
        return train(tiny_train(store, tmp_path / out, epochs=3, device="cuda", cache="gpu", checkpoint_seconds=0),
                     **kw)

    whole = run("whole")

    def stop_after_first(record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("cut", on_epoch=stop_after_first)
    resumed = run("cut")
    assert whole.throughput.captured and resumed.throughput.captured
    logs = [[json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()]
            for r in ("whole", "cut")]
    assert [e["loss"] for e in logs[1]] == pytest.approx([e["loss"] for e in logs[0]], rel=1e-5)
    assert resumed.best_epoch == whole.best_epoch
    a = torch.load(tmp_path / "whole" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_checkpoints_follow_checkpoint_seconds_without_changing_results(store, tmp_path, monkeypatch):
    """--checkpoint-seconds 0 writes last.pt after every epoch; a long interval writes none during the run and
    best.pt once, at the end, holding the selected epoch's model; the results are the same."""
    from fpt.train import files

    real_save, saves = files.save_checkpoint, []

    def spy(path, kind, content):
        saves.append((path.parent.name, kind, content["epoch"]))
        real_save(path, kind, content)

    monkeypatch.setattr(files, "save_checkpoint", spy)
    every = train(tiny_train(store, tmp_path / "every", epochs=3, checkpoint_seconds=0))
    rare = train(tiny_train(store, tmp_path / "rare", epochs=3, checkpoint_seconds=1e9))
    written = {(run, kind): [e for r, k, e in saves if (r, k) == (run, kind)] for run in ("every", "rare")
               for kind in ("best", "last")}
    assert written[("every", "last")] == [0, 1, 2] and written[("rare", "last")] == []
    assert written[("rare", "best")] == [rare.best_epoch] == [written[("every", "best")][-1]]
    assert rare.test == every.test and rare.val == every.val
    a, b = (torch.load(tmp_path / run / "best.pt", weights_only=True)["model"] for run in ("every", "rare"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FptError, match="--checkpoint-seconds -1"):
        tiny_train(store, tmp_path / "bad", checkpoint_seconds=-1)


def test_run_checkpoints_are_handed_over_by_their_clock_best_pt_before_last_pt(store, tmp_path):
    """``RunCheckpoints`` on a clock of its own: with --checkpoint-seconds 10 and epochs of 6 s the files go to the
    writer after epochs 1 and 3 (10 s after the previous hand-over, not after the run's start), each time best.pt
    (the pending best epoch) before last.pt; what was handed over is not handed over again. With 0 every epoch
    is, even when no time passed."""
    from fpt.train.loop import RunCheckpoints, set_up

    class Writer:
        def __init__(self):
            self.submitted = []

        def submit(self, path, kind, content):
            assert path.name == f"{kind}.pt"
            self.submitted.append((kind, content["epoch"]))

    run = set_up(tiny_train(store, tmp_path / "run", epochs=4))
    now, writer = [0.0], Writer()
    checkpoints = RunCheckpoints(run, writer, every_s=10, clock=lambda: now[0])
    for epoch in range(4):
        now[0] += 6
        if epoch in (0, 2):                             # new best epochs
            run.state.best.epoch = epoch
        checkpoints.epoch_done(epoch)
    assert writer.submitted == [("best", 0), ("last", 1), ("best", 2), ("last", 3)]
    checkpoints.write(last=False)                       # the run's end: nothing pending
    assert len(writer.submitted) == 4

    writer = Writer()
    checkpoints = RunCheckpoints(run, writer, every_s=0, clock=lambda: 0.0)
    for epoch in range(2):
        checkpoints.epoch_done(epoch)
    assert writer.submitted == [("last", 0), ("last", 1)]


def test_a_run_that_stops_and_cannot_save_keeps_its_own_error(store, tmp_path, monkeypatch):
    """When saving last.pt after a stop fails too (e.g. the device is gone), the stop's error is what is raised,
    with one warning that --resume continues from the previous last.pt."""
    from fpt.train import files

    def lost(*args, **kwargs):
        raise RuntimeError("device lost")

    def stop(record):
        monkeypatch.setattr(files, "copy_tensors", lost)
        raise ValueError("stopped by the caller")

    with pytest.warns(RuntimeWarning, match="last.pt not updated .*device lost"), \
            pytest.raises(ValueError, match="stopped by the caller"):
        train(tiny_train(store, tmp_path / "run", epochs=3), on_epoch=stop)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_fpt_with_all_twelve_layers_has_the_papers_learnable_share():
    """Paper Table 1: FPT 1.81 % of ViT-B's parameters (all 12 layers), FPT+ 1.03 % (6 layers). Over the LPM as
    published (ViT-B/16-384 with its head, the count that gives Table 4's six shares to the digit), FPT comes out
    at 1.80 %: no one count of the LPM gives both tables (the headless model at 512 px gives FPT's 1.81 but
    misses two of Table 4's), and fpt follows Table 4."""
    from fpt.extract.backbone import published_parameter_count
    from fpt.train import parameter_counts

    lpm = published_parameter_count("vit_base_patch16_384")
    vit_b = dict(lpm_dim=768, lpm_heads=12, head_dim=64, patch_size=16, n_classes=2, side_res=128, prompts=16)
    fpt = parameter_counts(build_model(ModelSpec(**vit_b, layers=12, method="fpt")), lpm)["ratio_percent"]
    plus = parameter_counts(build_model(ModelSpec(**vit_b, layers=6, method="fpt+")), lpm)["ratio_percent"]
    assert lpm == 86_859_496 and round(fpt, 2) == 1.80 and round(plus, 2) == 1.03


def test_files_written_atomically_get_the_mode_of_a_plain_file_and_a_full_disk_is_an_oserror(tmp_path,
                                                                                              monkeypatch):
    """atomic_write's temporary file is the owner's only (mkstemp): the file it becomes is not (metrics.json,
    sweep.csv and plots are read by others). A checkpoint that does not fit fails as the file's write, with the
    system's error, and leaves nothing behind."""
    import errno
    import os
    from pathlib import Path

    from fpt.train import files

    umask = os.umask(0o027)
    try:
        files._umask.cache_clear()
        files.atomic_write_text(tmp_path / "metrics.json", "{}")
        assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
        files._umask.cache_clear()

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left on device"):
        files.save_checkpoint(tmp_path / "best.pt", "best", {"model": {"w": torch.zeros(3)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_file_that_cannot_be_loaded_is_said_in_one_whole_sentence(tmp_path):
    """torch's reasons for an empty or a cut-short file: an empty EOFError, and a paragraph of which a cut
    would end mid-sentence; failure_reason gives each in words, whole."""
    from fpt import FptError
    from fpt.train.files import read_checkpoint, save_checkpoint

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(FptError, match=r"\(EOFError: the file ended early: empty, cut short, or not a saved model\)"):
        read_checkpoint(tmp_path / "empty.pt", "best")
    save_checkpoint(tmp_path / "whole.pt", "best", {"model": {"w": torch.zeros(1000)}})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
    with pytest.raises(FptError, match=r"failed finding central directory\)$"):
        read_checkpoint(tmp_path / "cut.pt", "best")
