"""Every supported ViT family is exact: the q/k/v the LPM selects from, and the K/V it stores, are those the
family's own attention uses, checked against its eager attention (probabilities and output read in the block with
fused attention off). Unsupported families are refused in one line before anything is loaded."""
import json

import pytest
import timm
import torch

import fpt.extract.backbone as backbone
from fpt import FptError
from fpt.extract import FrozenLPM, create_backbone
from tests.helpers import TINY_FAMILY, assert_is_topk, tiny_family_model as tiny

RES, PATCH = TINY_FAMILY["img_size"], TINY_FAMILY["patch_size"]

# (timm name, extra kwargs, prefix tokens, class token)
FAMILIES = {
    "vit": ("vit_base_patch16_224", {}, 1, True),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}, 2, True),
    "deit3": ("deit3_small_patch16_224", {}, 1, True),
    "vit-qk-norm": ("vit_small_patch16_224", dict(qk_norm=True), 1, True),      # the fused hook's q/k norms
    "dinov2": ("vit_small_patch14_dinov2", {}, 1, True),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", {}, 5, True),
    "clip": ("vit_base_patch16_clip_224", {}, 1, True),
    "siglip": ("vit_base_patch16_siglip_224", {}, 0, False),
    "gap-registers": ("vit_so150m_patch16_reg4_gap_256", {}, 4, False),
    "eva02": ("eva02_tiny_patch14_224", {}, 1, True),
    "eva02-unfused-qkv": ("eva02_base_patch16_clip_224", {}, 1, True),
    "vit-rope": ("vit_small_patch16_rope_224", {}, 1, True),
    "vit-rope-mixed": ("vit_small_patch16_rope_mixed_224", {}, 1, True),
    "vit-rope-gqa": ("vit_small_patch16_rope_224", dict(qkv_fused=False, num_kv_heads=1), 1, True),
    # two K/V heads for four query heads: query head h attends with K/V head h // 2 (one K/V head hides the order)
    "vit-rope-gqa-2": ("vit_small_patch16_rope_224", dict(qkv_fused=False, num_heads=4, num_kv_heads=2), 1, True),
    "dinov3": ("vit_small_patch16_dinov3", {}, 5, True),
}


def eager_attention(model, images, layers):
    """Per layer: (attention probabilities [B, H, N, N], attention output before its projection [B, N, H*d]),
    read inside the family's own attention with fused attention off."""
    probs, outputs, hooks, fused = {}, {}, [], {}
    for l in layers:
        attn = model.blocks[l].attn
        fused[l], attn.fused_attn = attn.fused_attn, False
        hooks.append(attn.attn_drop.register_forward_hook(lambda m, a, o, l=l: probs.__setitem__(l, o)))
        hooks.append(attn.norm.register_forward_pre_hook(lambda m, a, l=l: outputs.__setitem__(l, a[0])))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        for l in layers:
            model.blocks[l].attn.fused_attn = fused[l]
    return {l: (probs[l], outputs[l]) for l in layers}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["global", "cls"])
def test_selection_and_kv_equal_the_familys_eager_attention(family, mode, monkeypatch):
    name, extra, prefix, class_token = FAMILIES[family]
    model = tiny(name, **extra)
    assert model.num_prefix_tokens == prefix and backbone.has_class_token(model) == class_token
    layers = [0, 1]
    if mode == "cls" and not class_token:
        with pytest.raises(FptError, match="--importance cls needs a class token"):
            FrozenLPM(model, layers, token_ratio=0.25, importance=mode)
        return
    seen = []                                          # what the selection was given: q, k, v, scale per layer
    select = backbone.select_important_tokens
    monkeypatch.setattr(backbone, "select_important_tokens",
                        lambda q, k, v, scale, *a: seen.append((q, k, v, scale)) or select(q, k, v, scale, *a))
    lpm = FrozenLPM(model, layers, token_ratio=0.25, importance=mode, query_block=5)
    images = torch.randn(2, 3, RES, RES)
    out = lpm(images)
    captured = list(seen)                               # the oracle's run below goes through the hooks again
    oracle = eager_attention(model, images, layers)
    n_tokens = (RES // PATCH) ** 2 + prefix
    k_sel = lpm.n_selected(RES)
    assert k_sel == int(n_tokens * 0.25) and len(captured) == len(layers)
    for i, l in enumerate(layers):
        probs, attended = oracle[l]
        q, k, v, scale = captured[i]
        B, H, N, d = k.shape
        assert N == n_tokens and H == model.blocks[l].attn.num_heads
        # q/k are the attention's own (rotary embedding included), v is the one it averages
        torch.testing.assert_close(torch.softmax(q @ k.transpose(-2, -1) * scale, -1), probs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close((probs @ v).transpose(1, 2).reshape(B, N, H * d), attended, rtol=1e-4, atol=1e-5)
        importance = probs.mean(-2) if mode == "global" else probs[:, :, 0]
        assert_is_topk(out["indices"][:, i], importance, k_sel)
        gather = out["indices"][:, i].unsqueeze(-1).expand(-1, -1, -1, d)
        torch.testing.assert_close(out["keys"][:, i], k.gather(2, gather))
        torch.testing.assert_close(out["values"][:, i], v.gather(2, gather))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(out["cls"], pooled)


def test_rope_without_the_rotary_embedding_would_select_other_tokens():
    """The oracle can tell: q/k taken before the rotary embedding (what the LPM captured before) disagree."""
    model = tiny("vit_small_patch16_rope_224")
    attn, images = model.blocks[1].attn, torch.randn(2, 3, RES, RES)
    inputs = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: inputs.update(x=a[0], rope=kw["rope"]), with_kwargs=True)
    probs = eager_attention(model, images, [1])[1][0]
    handle.remove()
    q, k, _ = backbone.rope_qkv(attn, inputs["x"], None)
    assert not torch.allclose(torch.softmax(q @ k.transpose(-2, -1) * attn.scale, -1), probs, atol=1e-3)
    q, k, _ = backbone.rope_qkv(attn, inputs["x"], inputs["rope"])
    torch.testing.assert_close(torch.softmax(q @ k.transpose(-2, -1) * attn.scale, -1), probs, rtol=1e-4, atol=1e-5)


def tiny_architectures(monkeypatch):
    """create_backbone builds the tiny size of whatever timm name it is given."""
    real = timm.create_model
    arch = {k: v for k, v in TINY_FAMILY.items() if k not in ("img_size", "num_classes")}
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: real(*a, **{**arch, **kw}))


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224",
                                  "vit_base_patch16_siglip_224"])
def test_create_backbone_builds_each_family_and_loads_its_weights(name, tmp_path, monkeypatch):
    source = tiny(name)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    tiny_architectures(monkeypatch)
    model, info = create_backbone(name, 48, weights=tmp_path / "w.pth")       # 4x4 -> 6x6 patch grid
    torch.testing.assert_close(model.blocks[1].attn.proj.weight, source.blocks[1].attn.proj.weight)
    assert model.pos_embed.shape == timm.create_model(name, img_size=48).pos_embed.shape     # resampled
    # the buffers no file holds (EVA's RoPE tables) are the ones the model computes when built
    fresh, kept = dict(timm.create_model(name, img_size=48, num_classes=0).named_buffers()), model.state_dict()
    for key, buffer in model.named_buffers():
        assert key in kept or torch.equal(buffer, fresh[key]), key
    assert info.family == ("eva" if name.startswith("eva") else "vit") and not info.random_init
    assert info.prefix_tokens == source.num_prefix_tokens and info.class_token == backbone.has_class_token(source)
    lpm = FrozenLPM(model, [1], 0.25)
    assert lpm(torch.randn(1, 3, 48, 48))["keys"].shape == (1, 1, 2, lpm.n_selected(48), 32)


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "vit_relpos_base_patch16_224", "samvit_base_patch16",
                                  "vit_base_r50_s16_224", "vit_base_patch16_xp_224", "vit_small_patch16_18x2_224",
                                  "naflexvit_base_patch16_gap", "swin_tiny_patch4_window7_224",
                                  "convnext_tiny"])
def test_unsupported_families_are_refused_in_one_line_naming_the_supported(name, tmp_path):
    weights = tmp_path / "never-read.pth"
    weights.write_bytes(b"not read: the family is refused first")
    with pytest.raises(FptError) as e:
        create_backbone(name, 224, weights=weights)
    message = str(e.value)
    assert "is not a supported ViT family" in message and "\n" not in message
    assert "DINOv2" in message and "EVA-02" in message and "SigLIP" in message


def write_hub_cache(cache, repo: str, config: dict) -> None:
    """A Hugging Face hub cache holding only ``repo``'s config.json (the layout huggingface_hub reads)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def cached_hub_model(tmp_path, monkeypatch) -> torch.nn.Module:
    """``hf-hub:org/rad-dino-like`` in an offline Hugging Face cache of its own: a tiny DINOv2 (patch ``PATCH``,
    which its name does not say) whose weights are in tmp_path/w.pth; returns the model they come from."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    small = {k: v for k, v in TINY_FAMILY.items() if k not in ("img_size", "num_classes")}
    write_hub_cache(tmp_path / "hub", "org/rad-dino-like", {
        "architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0, "model_args": small,
        "pretrained_cfg": {"input_size": [3, RES, RES]}})
    source = tiny("vit_small_patch14_reg4_dinov2")
    torch.save(source.state_dict(), tmp_path / "w.pth")
    return source


def test_hf_hub_names_with_weights_build_offline_from_the_cached_config(tmp_path, monkeypatch):
    source = cached_hub_model(tmp_path, monkeypatch)
    model, info = create_backbone("hf-hub:org/rad-dino-like", RES, weights=tmp_path / "w.pth")
    assert info.name == "hf-hub:org/rad-dino-like" and info.prefix_tokens == 5 and info.embed_dim == 64
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    # not in the cache: one line that says what to pass instead, and no download attempt
    with pytest.raises(FptError, match="pass the timm architecture name instead") as e:
        create_backbone("hf-hub:org/not-cached", RES, weights=tmp_path / "w.pth")
    assert "\n" not in str(e.value)
    with pytest.raises(FptError, match="not in the local Hugging Face cache"):
        create_backbone("hf-hub:org/not-cached", RES, random_init=True)


def test_an_image_res_below_the_patch_is_refused_before_the_store_is_made(image_folder, tmp_path, monkeypatch):
    """No side network could train on low-res copies smaller than one LPM patch (--side-res is a multiple of the
    patch, at most --image-res): refused from the name where it says the patch, else once the model is built. One
    whole patch is enough."""
    from fpt.config import extract_config
    from fpt.extract import extract

    cached_hub_model(tmp_path, monkeypatch)
    out = tmp_path / "s.zarr"
    with pytest.raises(FptError, match=f"--image-res {PATCH - 1} is smaller than the patch size {PATCH} of hf-hub"):
        extract(extract_config(None, image_folder, out=out, backbone="hf-hub:org/rad-dino-like",
                               weights=tmp_path / "w.pth", res=RES, image_res=PATCH - 1, device="cpu"))
    assert not out.exists()
    with pytest.raises(FptError, match="--image-res 15 is smaller than the patch size 16 of vit_tiny_patch16_224"):
        extract_config(None, image_folder, out=out, backbone="vit_tiny_patch16_224", random_init=True, res=64,
                       image_res=15)
    assert not out.exists()
    # one whole patch is enough: --side-res 16 trains on it
    assert extract_config(None, image_folder, out=out, backbone="vit_tiny_patch16_224", random_init=True, res=64,
                          image_res=16).image_res == 16


def test_cli_refuses_an_unsupported_family_before_writing_anything(image_folder, tmp_path):
    from typer.testing import CliRunner

    from fpt.cli import app

    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", "--data", str(image_folder), "--backbone", "beit_base_patch16_224",
                                      "--random-init", "--res", "224", "--image-res", "128", "--out", str(out)])
    assert result.exit_code == 2
    (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "not a supported ViT family" in " ".join(result.output.split()) and not out.exists()
