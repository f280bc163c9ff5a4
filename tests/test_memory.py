"""Peak training memory: the per-run tracker and the one-step measurement of the paper's setting."""
import time

import numpy as np
import pytest
import torch

from fpt.train.memory import PAPER_SPEC, PeakMemory, StepShape, measure_training_step
from fpt.train.model import ModelSpec

SMALL = ModelSpec(lpm_dim=32, lpm_heads=2, head_dim=16, patch_size=8, layers=2, n_classes=2, side_res=16, prompts=3,
                  reduction=4)


def test_cpu_peak_sees_a_short_lived_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        block = np.ones(64 * 2**20 // 8)                                     # 64 MB, touched, then freed
        deadline = time.monotonic() + 10                                    # a few sampling periods, however busy
        while memory._peak - memory.baseline_mb < 60 and time.monotonic() < deadline:   # the machine is
            time.sleep(0.01)
        del block
    assert memory.kind == "cpu_peak_rss" and memory.peak_mb - memory.baseline_mb >= 60


def test_one_step_measurement_on_cpu():
    shape = StepShape(batch_size=2, layers=2, heads=2, k=5, head_dim=16, image_res=32)
    result = measure_training_step(SMALL, shape, torch.device("cpu"), steps=2)
    assert len(result["losses"]) == 2 and all(0 < loss < 10 for loss in result["losses"])     # both steps ran
    assert result["kind"] == "cpu_peak_rss" and result["peak_mb"] >= result["baseline_mb"] > 0
    from fpt.train.model import build_model

    trainable = sum(p.numel() for p in build_model(SMALL).parameters() if p.requires_grad)
    assert result["learnable"] == trainable and result["shape"]["k"] == 5



def test_one_step_measurement_says_what_the_step_added_to_the_memory_held_before():
    """``added_mb``: the step's peak above the baseline measured before it (what one more run adds beside others),
    from the same measurement as the peak and baseline it reports (each rounded to 0.1 MB)."""
    shape = StepShape(batch_size=2, layers=2, heads=2, k=5, head_dim=16, image_res=32)
    result = measure_training_step(SMALL, shape, torch.device("cpu"))
    assert result["baseline_mb"] > 0
    assert result["added_mb"] == pytest.approx(result["peak_mb"] - result["baseline_mb"], abs=0.11)

def test_paper_setting_is_vit_b_512():
    assert (PAPER_SPEC.lpm_dim, PAPER_SPEC.layers, PAPER_SPEC.prompts, PAPER_SPEC.side_res) == (768, 6, 16, 128)
    s = StepShape()
    assert (s.batch_size, s.layers, s.heads, s.k, s.head_dim) == (16, 6, 12, (32 * 32 + 1) * 2 // 10, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paper_setting_peak_gpu_memory():
    """ViT-B 512 -> side 128, batch 16, 16 prompts: the paper reports 736 MB for FPT+ (1824 MB for FPT). Through
    the capture of the step as a CUDA graph and a replay, as fpt train runs it."""
    from fpt.train.step import GRAPH_WARMUP

    result = measure_training_step(device=torch.device("cuda"), steps=GRAPH_WARMUP + 2)
    print(f"\npeak training memory (torch.cuda.max_memory_allocated): {result['peak_mb']:.0f} MB; paper: 736 MB")
    assert result["kind"] == "cuda_max_allocated" and result["captured"] and 0 < result["peak_mb"] < 1824


def test_blocks_that_overlap_in_one_process_say_their_peak_is_shared():
    """Two runs in threads of one process: each block's peak is the process's, so each says so (kind ends in
    _shared); a block alone before or after them does not."""
    import threading

    cpu = torch.device("cpu")
    with PeakMemory(cpu) as alone:
        pass
    inside, release = threading.Event(), threading.Event()
    other: list[PeakMemory] = []

    def second():
        with PeakMemory(cpu) as memory:
            other.append(memory)
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=second)
    with PeakMemory(cpu) as first:
        thread.start()
        assert inside.wait(5)
    release.set()
    thread.join()
    with PeakMemory(cpu) as after:
        pass
    assert (alone.kind, after.kind) == ("cpu_peak_rss", "cpu_peak_rss")
    assert first.shared and other[0].shared and first.kind == other[0].kind == "cpu_peak_rss_shared"
