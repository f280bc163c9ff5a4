"""The defaults are the published FPT+ configuration (shared/official-fpt-configs.md; README "Fidelity")."""
import numpy as np
import pytest
import torch

from fpt.config import (AUGMENT_PRESETS, BACKBONE_ALIASES, AugmentConfig, extract_config, pipeline_entry,
                        sweep_config, train_config)
from fpt.train.data import MemorySplit, SideInput, StreamSplit
from fpt.train.metrics import classification_metrics
from fpt.train.model import FptFusionModule, FusionModule, ModelSpec, SideNetwork, prompt_attention

# dataset: (classes, mean, std, lr), as published by the public FPT+ code's dataset configs
PUBLISHED = {
    "messidor2": (5, (0.48436370, 0.22381182, 0.07583175), (0.29392081, 0.14721708, 0.06350880), 2e-4),
    "ddr": (5, (0.42373750, 0.26094607, 0.12840390), (0.29482535, 0.20167366, 0.13668020), 5e-4),
    "cmmd": (2, (0.16735268,) * 3, (0.18016799,) * 3, 5e-5),
    "ddsm": (3, (0.20267013,) * 3, (0.22466831,) * 3, 1e-3),
    "isic2016": (2, (0.72438824, 0.61871672, 0.56646055), (0.16384567, 0.17090139, 0.19106050), 5e-3),
    "isic2018": (7, (0.76356274, 0.54660755, 0.57074833), (0.14041018, 0.15191355, 0.16923356), 1e-4),
    "covid": (3, (0.49834183, 0.49863863, 0.49894729), (0.24262029, 0.24259140, 0.24264234), 1e-4),
    "chncxr": (2, (0.61054890,) * 3, (0.25847816,) * 3, 5e-4),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_dataset_entry_is_the_published_one(name, tmp_path, monkeypatch):
    classes, mean, std, lr = PUBLISHED[name]
    monkeypatch.setenv(pipeline_entry(name)["data_env"], str(tmp_path))
    ex = extract_config(name)
    assert len(ex.classes) == classes
    np.testing.assert_allclose(ex.mean, mean, rtol=1e-7)      # LPM input; the store hands the same to the side input
    np.testing.assert_allclose(ex.std, std, rtol=1e-7)
    assert ex.res == 512 and ex.token_ratio == 0.2 and ex.importance == "global"
    cfg = train_config(tmp_path / "s.zarr", name)
    assert cfg.lr == lr and cfg.weight_decay == 0.1 and cfg.epochs == 20 and cfg.batch_size == 16
    assert cfg.side_res == 128 and cfg.prompts == 16 and cfg.reduction == 8 and cfg.method == "fpt+"
    assert cfg.augment == AugmentConfig() and cfg.drop_last is True


def test_a_new_dataset_gets_auto_statistics_and_the_code_defaults(image_folder, tmp_path):
    ex = extract_config(None, image_folder, out=tmp_path / "o.zarr")
    assert ex.mean == "auto" and ex.std == "auto"
    assert ex.backbone == BACKBONE_ALIASES["fpt-code"] == "vit_base_patch16_384.orig_in21k_ft_in1k"
    cfg = train_config(tmp_path / "o.zarr", "data")
    assert cfg.lr == 1e-4 and cfg.weight_decay == 0.1 and cfg.augment == AUGMENT_PRESETS["paper"] and cfg.drop_last


def test_backbones_are_one_option_away(image_folder):
    for alias, name in BACKBONE_ALIASES.items():
        assert extract_config(None, image_folder, backbone=alias).backbone == name
    assert extract_config(None, image_folder, backbone="vit_small_patch16_224").backbone == "vit_small_patch16_224"


def test_paper_augmentation_values():
    a = AugmentConfig()
    assert (a.scale, a.ratio, a.hflip, a.vflip) == ((0.8, 1.0), (0.7, 1.3), 0.5, 0.0)
    assert (a.brightness, a.contrast, a.saturation) == (0.2, 0.2, 0.0)
    assert AUGMENT_PRESETS["strong"].vflip == 0.5        # fpt's earlier choice stays one option away
    assert train_config("x.zarr", None, augment="strong,vflip=0").augment == AugmentConfig(
        scale=(0.6, 1.0), ratio=(0.8, 1.25), saturation=0.1)
    assert train_config("x.zarr", None, augment={"preset": "paper", "scale": [0.5, 1]}).augment.scale == (0.5, 1.0)


def test_augmentation_draws_follow_the_settings():
    """What SideInput actually draws per image: crop area and aspect, flips, jitter factors."""
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=0).sample(4000)
    area, aspect = p.crop_w * p.crop_h, p.crop_w / p.crop_h
    assert area.min() >= 0.8 - 1e-6 and area.max() <= 1 + 1e-6 and area.min() < 0.81 and area.max() > 0.99
    assert aspect.min() >= 0.7 - 1e-6 and aspect.max() <= 1.3 + 1e-6          # a crop of area >= 0.8 fits the
    assert aspect.min() < 0.81 and aspect.max() > 1.24                          # square image at aspect 0.8-1.25
    assert p.crop_w.max() <= 1 and p.crop_h.max() <= 1
    assert 0.45 < (p.flip_x < 0).float().mean() < 0.55 and (p.flip_y == 1).all()        # no vertical flip
    for factor in (p.brightness, p.contrast):
        assert factor.min() >= 0.8 and factor.max() <= 1.2 and factor.min() < 0.81 and factor.max() > 1.19
    assert (p.saturation == 1).all()
    strong = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=0, augment=AUGMENT_PRESETS["strong"]).sample(4000)
    assert 0.45 < (strong.flip_y < 0).float().mean() < 0.55 and (strong.crop_w * strong.crop_h).min() < 0.61


@pytest.mark.parametrize("preset", ["paper", "strong"])
def test_crops_and_jitter_orders_are_distributed_as_torchvision_draws_them(preset):
    """RandomResizedCrop redraws (area, aspect) until a crop fits, at most 10 times, then takes the whole image:
    that skews accepted areas to the small end (taking the area first and then only an aspect that fits, as fpt
    did until 2026-11-28, gave a mean area of 0.900 against 0.868 at the paper's settings). ColorJitter applies
    its adjustments in a random order per image. Both compared with torchvision's own draws."""
    import torchvision.transforms as T

    cfg = AUGMENT_PRESETS[preset]
    n = 20_000
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=0, augment=cfg).sample(n)
    torch.manual_seed(0)
    side = 1024                                   # torchvision rounds to pixels: fine enough at this size
    image = torch.empty(3, side, side)
    boxes = torch.tensor([T.RandomResizedCrop.get_params(image, list(cfg.scale), list(cfg.ratio))[2:]
                          for _ in range(n)], dtype=torch.float64) / side       # (h, w)
    ours = {"area": (p.crop_w * p.crop_h).double(), "aspect": (p.crop_w / p.crop_h).double()}
    theirs = {"area": boxes[:, 0] * boxes[:, 1], "aspect": boxes[:, 1] / boxes[:, 0]}
    for name in ours:
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):             # quantiles within sampling error (~0.01 at n = 20,000)
            a, b = (torch.quantile(t[name], q).item() for t in (ours, theirs))
            assert abs(a - b) < 0.012, (name, q, a, b)
    assert abs((ours["area"] > 0.999).double().mean() - (theirs["area"] > 0.999).double().mean()) < 0.01
    orders = 6 if cfg.saturation else 2          # the adjustments torchvision applies: b, c (paper), b, c, s
    assert p.jitter_order.shape == (n, 3 if cfg.saturation else 2)
    counts = torch.unique(p.jitter_order, dim=0, return_counts=True)[1]
    assert len(counts) == orders and (counts - n / orders).abs().max() < 5 * (n / orders) ** 0.5   # equally likely


def test_each_jitter_factor_follows_its_own_setting():
    """--augment brightness, contrast and saturation are three settings: each factor is drawn uniformly in
    [max(0, 1 - x), 1 + x] for its own x (the presets give brightness and contrast the same x, which would hide one
    taking the other's)."""
    cfg = AugmentConfig(brightness=0.1, contrast=0.4, saturation=0.25)
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=0, augment=cfg).sample(4000)
    for factor, x in ((p.brightness, cfg.brightness), (p.contrast, cfg.contrast), (p.saturation, cfg.saturation)):
        assert factor.min() >= 1 - x - 1e-6 and factor.max() <= 1 + x + 1e-6
        assert factor.min() < 1 - 0.95 * x and factor.max() > 1 + 0.95 * x, (x, factor.min(), factor.max())


def test_a_jitter_setting_above_one_draws_factors_from_zero():
    """A jitter setting x above 1 draws its factor in [max(0, 1 - x), 1 + x], as torchvision's ColorJitter: from 0
    (black, or the mean grey), never a negative factor that would invert the image."""
    cfg = AugmentConfig(brightness=1.5, contrast=1.2, saturation=2.0)
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=0, augment=cfg).sample(4000)
    for factor, x in ((p.brightness, cfg.brightness), (p.contrast, cfg.contrast), (p.saturation, cfg.saturation)):
        assert factor.min() >= 0 and factor.max() <= 1 + x + 1e-6
        assert factor.min() < 0.05 * (1 + x) and factor.max() > 0.95 * (1 + x), (x, factor.min(), factor.max())


@pytest.mark.parametrize("ratio", [(1.25, 1.5), (0.5, 0.8)])
def test_a_crop_no_try_fits_is_torchvisions_whole_image_at_the_nearest_allowed_aspect(ratio):
    """When none of RandomResizedCrop's tries fits the image (here every one: the whole area at an aspect other
    than the square's), torchvision takes the central crop of the whole width or height at the allowed aspect
    nearest the image's; with a square image: the full side by side / ratio, or side * ratio by the full side."""
    import torchvision.transforms as T

    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=ratio)
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=0, augment=cfg).sample(64)
    side = 1000
    _, _, h, w = T.RandomResizedCrop.get_params(torch.empty(3, side, side), list(cfg.scale), list(cfg.ratio))
    assert (w, h) != (side, side)
    torch.testing.assert_close(p.crop_w, torch.full((64,), w / side), atol=1e-3, rtol=0)
    torch.testing.assert_close(p.crop_h, torch.full((64,), h / side), atol=1e-3, rtol=0)


@pytest.mark.parametrize("preset", ["paper", "strong"])
def test_crop_positions_are_uniform_over_every_place_the_crop_fits(preset):
    """RandomResizedCrop places a crop of side w uniformly among the places it fits (torchvision: a uniform top-left
    corner): in [-1, 1] image coordinates the centre is uniform in [-(1 - w), 1 - w] on each axis, on either side
    of the image centre, not in one half only (which would never show the model the other half's crops)."""
    n = 20_000
    p = SideInput(16, (0.5,) * 3, (0.25,) * 3, seed=0, augment=AUGMENT_PRESETS[preset]).sample(n)
    for centre, size in ((p.centre_x, p.crop_w), (p.centre_y, p.crop_h)):
        room = 1 - size
        placed = room > 0.01                          # crops with room to move (the whole image has none)
        assert (centre.abs() <= room + 1e-6).all() and placed.sum() > n / 2
        where = (centre[placed] / room[placed]).double()   # the centre's place in its room: uniform in [-1, 1]
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            assert abs(torch.quantile(where, q).item() - (2 * q - 1)) < 0.03, (q, torch.quantile(where, q).item())


SPEC = dict(lpm_dim=64, lpm_heads=4, head_dim=16, patch_size=8, layers=3, n_classes=3, side_res=16, prompts=16,
            reduction=8)


@pytest.mark.parametrize("fusion", [FusionModule, FptFusionModule])
def test_prompt_init_is_normal_with_std_1e_6(fusion):
    torch.manual_seed(0)
    prompts = fusion(layers=6, prompts=16, lpm_dim=768, lpm_heads=12, side_dim=96).prompts.detach().double()
    assert abs(prompts.std().item() - 1e-6) < 0.05e-6 and abs(prompts.mean().item()) < 0.05e-6
    assert prompts.abs().max().item() > 3e-6                    # normal tails, not a truncated normal


def test_first_cross_attention_is_nearly_uniform():
    torch.manual_seed(0)
    model = SideNetwork(ModelSpec(**SPEC))
    assert model.fusion.prompts.std().item() < 2e-6               # measured on the built model
    keys = torch.randn(2, 3, 4, 10, 16)
    weights = prompt_attention(model.fusion.query(), keys)        # [B, L, H, P, k]
    torch.testing.assert_close(weights, torch.full_like(weights, 0.1), atol=1e-2, rtol=0)


def test_optimizer_as_built_is_adamw_with_weight_decay_on_all_parameters(micro_store, tmp_path, monkeypatch):
    from fpt.train import train

    built = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    cfg = train_config(micro_store, None, out=tmp_path / "run", side_res=16, epochs=1, batch_size=4, prompts=3,
                       device="cpu")
    assert cfg.weight_decay == 0.1
    train(cfg)
    (opt,) = built
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1] * len(opt.param_groups)
    assert all(g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    from fpt.train.loop import load_checkpoint
    model = load_checkpoint(tmp_path / "run" / "best.pt").model
    assert n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("drop_last", [True, False])
def test_the_cosine_schedule_spans_exactly_the_steps_the_run_takes(micro_store, tmp_path, monkeypatch, drop_last):
    """The learning rate follows one cosine from lr to 0 over the whole run: its length is the optimizer steps the
    run takes (epochs x the train batches of an epoch, the partial one left out with drop_last), so the last step
    runs at the bottom of the cosine, not part-way down it (too long) nor past it, back up (too short)."""
    from fpt.train import loop, train

    built = []
    make_optimizer = loop.make_optimizer

    def spy(*args, **kwargs):
        built.append(make_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "make_optimizer", spy)
    cfg = train_config(micro_store, None, out=tmp_path / "run", side_res=16, epochs=2, batch_size=3, prompts=3,
                       device="cpu", drop_last=drop_last)
    train(cfg)
    ((optimizer, schedule),) = built
    steps = int(optimizer.state[optimizer.param_groups[0]["params"][0]]["step"])     # AdamW's own count
    assert steps > 0 and schedule.T_max == steps == schedule.last_epoch     # 8 train samples: not whole batches of 3
    assert schedule.get_last_lr()[0] == pytest.approx(0, abs=1e-12 * cfg.lr)


@pytest.mark.parametrize("kind", ["memory", "stream"])
def test_drop_last_gives_only_full_batches(micro_store, kind):
    from fpt.store import StoreReader

    reader = StoreReader(micro_store)
    cpu = torch.device("cpu")
    data = (MemorySplit(reader, "train", ("images",), cpu) if kind == "memory"
            else StreamSplit(reader, "train", ("images",), cpu, 0, window_samples=3))
    n = len(data)                                                 # 8 train samples
    sizes = [len(b["labels"]) for b in data.batches(3, shuffle=True, rng=np.random.default_rng(0), drop_last=True)]
    assert sizes == [3] * (n // 3)
    kept = [len(b["labels"]) for b in data.batches(3, shuffle=True, rng=np.random.default_rng(0))]
    assert sum(kept) == n and kept[-1] == n % 3


def quadratic_kappa(labels, preds, n):
    """Plain reference: 1 - sum(w * observed) / sum(w * expected), w_ij = (i - j)^2 / (n - 1)^2."""
    observed = np.zeros((n, n))
    for a, b in zip(labels, preds):
        observed[a, b] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(labels)
    w = np.subtract.outer(np.arange(n), np.arange(n)) ** 2 / (n - 1) ** 2
    return 1 - (w * observed).sum() / (w * expected).sum()


def test_kappa_is_quadratic_weighted():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 8)
    scores = rng.random((40, 5)) + np.eye(5)[np.clip(labels + rng.integers(-1, 2, 40), 0, 4)]
    probs = scores / scores.sum(1, keepdims=True)
    assert classification_metrics(labels, probs)["kappa"] == pytest.approx(quadratic_kappa(labels, probs.argmax(1), 5))
    scores[:, 4] = 0                                              # class 4 never predicted: still a 5x5 weighting
    probs = scores / scores.sum(1, keepdims=True)
    assert classification_metrics(labels, probs)["kappa"] == pytest.approx(quadratic_kappa(labels, probs.argmax(1), 5))
    binary_labels = np.array([0, 1, 1, 0, 0, 1])
    binary = np.eye(2)[[0, 1, 1, 0, 1, 0]] + rng.random((6, 2))
    binary /= binary.sum(1, keepdims=True)
    from sklearn.metrics import cohen_kappa_score                 # two classes: plain kappa
    assert classification_metrics(binary_labels, binary)["kappa"] == pytest.approx(
        cohen_kappa_score(binary_labels, binary.argmax(1)))


def test_sweep_grid_is_around_the_published_lr():
    cfg = sweep_config("cmmd.zarr", "cmmd")
    assert cfg.lrs == [2.5e-5, 5e-5, 1e-4] and cfg.weight_decays == [0.05, 0.1] and cfg.seeds == 5
    assert sweep_config("x.zarr", "isic2016").lrs == [0.0025, 0.005, 0.01]
    assert sweep_config("x.zarr", "isic2016", lr="1e-3").lrs == [1e-3]
