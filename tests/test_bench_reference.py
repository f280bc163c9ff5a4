"""The benchmarks' re-implementation of the official approach (bench/official.py) selects the same tokens and
K/V as fpt, so the benchmarks compare equal work."""
import numpy as np
import pytest
import torch
from PIL import Image

from fpt.extract import FrozenLPM, create_backbone
from tests.conftest import MICRO

# bench/ is part of the source tree, not of an installed (non-editable) package
official = pytest.importorskip("fpt.bench.official")
OfficialExtractor, OfficialTrainData, save_per_image = (official.OfficialExtractor, official.OfficialTrainData,
                                                        official.save_per_image)


@pytest.mark.parametrize("mode", ["global", "cls"])
def test_official_selection_equals_ours(mode):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers = [1, 3]
    ours = FrozenLPM(create_backbone(MICRO, 64, random_init=True)[0], layers, 0.25, mode, query_block=7)(images)
    official = OfficialExtractor(create_backbone(MICRO, 64, random_init=True)[0], layers, 0.25, mode)(images)
    assert torch.equal(official["indices"], ours["indices"])
    torch.testing.assert_close(official["keys"], ours["keys"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(official["values"], ours["values"], rtol=1e-5, atol=1e-6)


def test_official_files_and_loader(tmp_path):
    keys, values = torch.randn(2, 2, 3, 4, 8), torch.randn(2, 2, 3, 4, 8)
    paths = save_per_image(tmp_path / "kv", ["a", "b"], keys, values)
    assert [p.name for p in paths] == ["a.safetensors", "b.safetensors"]
    for name in ("a", "b"):
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / f"{name}.png")
    data = OfficialTrainData([tmp_path / "a.png", tmp_path / "b.png"], [0, 1], tmp_path / "kv", 16,
                             (0.5,) * 3, (0.25,) * 3)
    (batch,) = data.batches(4, np.random.default_rng(0))
    assert batch["images"].shape == (2, 3, 16, 16) and batch["keys"].dtype == torch.float32
    order = batch["labels"].tolist()
    torch.testing.assert_close(batch["keys"], keys[order])
    torch.testing.assert_close(batch["values"], values[order])


def test_host_and_device_times_hold_the_gpu_before_the_timed_work(monkeypatch):
    """The launch-bound check of bench/train_speed.py: the device is held busy before the first timed event, so
    the host's issue time never includes a wait, and the device time runs from the end of the hold."""
    train_speed = pytest.importorskip("fpt.bench.train_speed")
    events = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing
            self.name = "start" if not any(e.startswith("Event") for e in events) else "end"
            events.append(f"Event {self.name}")

        def record(self):
            events.append(f"record {self.name}")

        def synchronize(self):
            events.append(f"synchronize {self.name}")

        def elapsed_time(self, other):
            return 250.0                                            # ms

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize device"))
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: events.append(("sleep", cycles)))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    host, device = train_speed.host_and_device_seconds(lambda: events.append("work"), torch.device("cuda"),
                                                       hold_s=0.5)
    assert events == ["synchronize device", "Event start", "Event end", ("sleep", int(1e9)), "record start", "work",
                      "record end", "synchronize end"]
    assert device == 0.25 and 0 <= host < 0.5          # the host's part, without the device's hold (0.5 s)


def test_the_official_loaders_batches_train_fpts_step(tmp_path):
    """The benches' official-style training feeds fpt's own step (``AlreadyAugmented``: its images come out of
    the loader augmented and normalised): the step takes them and trains."""
    from fpt.bench.data_path import AlreadyAugmented
    from fpt.train.model import ModelSpec, build_model
    from fpt.train.step import TrainStep, make_optimizer

    keys, values = torch.randn(2, 2, 3, 4, 8), torch.randn(2, 2, 3, 4, 8)
    save_per_image(tmp_path / "kv", ["a", "b"], keys, values)
    for name in ("a", "b"):
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / f"{name}.png")
    data = OfficialTrainData([tmp_path / "a.png", tmp_path / "b.png"], [0, 1], tmp_path / "kv", 16,
                             (0.5,) * 3, (0.25,) * 3)
    model = build_model(ModelSpec(lpm_dim=24, lpm_heads=3, head_dim=8, patch_size=8, layers=2, n_classes=2,
                                  side_res=16, prompts=2, reduction=4))
    optimizer, schedule = make_optimizer(model, 1e-2, 0.0, 2, torch.device("cpu"))
    step = TrainStep(model, AlreadyAugmented(), optimizer, schedule)
    before = [p.detach().clone() for p in model.parameters()]
    (batch,) = data.batches(4, np.random.default_rng(0))
    loss = step(batch, AlreadyAugmented().draw(1, len(batch["labels"]))[0])
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
