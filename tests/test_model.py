"""Fusion module against the paper's formulas; side network shapes and prompt removal; parameter shares."""
import pytest
import torch
import torch.nn.functional as F

from fpt.train import FusionModule, ModelSpec, SideNetwork, parameter_counts

SPEC = ModelSpec(lpm_dim=32, lpm_heads=2, head_dim=16, patch_size=8, layers=3, n_classes=4, side_res=32,
                 prompts=5, reduction=4)


def test_fusion_matches_paper_formula():
    torch.manual_seed(0)
    fusion = FusionModule(layers=3, prompts=5, lpm_dim=32, lpm_heads=2, side_dim=8, dropout=0.0)
    keys, values = torch.randn(2, 3, 2, 7, 16), torch.randn(2, 3, 2, 7, 16)
    out = fusion(keys, values)
    assert out.shape == (2, 3, 5, 8)
    for b in range(2):
        for l in range(3):
            p = fusion.prompts[l]                                            # [P, D]
            q = F.layer_norm(p, (32,), fusion.norm.weight, fusion.norm.bias)  # LN(p)
            heads = []
            for h in range(2):
                qh = q[:, h * 16:(h + 1) * 16]                               # split into the LPM's heads
                attn = torch.softmax(qh @ keys[b, l, h].T / 16 ** 0.5, dim=-1)
                heads.append(attn @ values[b, l, h])
            context = torch.cat(heads, dim=-1)                               # CA(p, z_M)
            expected = fusion.out_proj(context + p)                          # f_out(CA + p)
            torch.testing.assert_close(out[b, l], expected, rtol=1e-5, atol=1e-5)


def test_side_network_appends_and_removes_prompts_every_layer():
    model = SideNetwork(SPEC).eval()
    seen = []
    for block in model.vit.blocks:
        block.register_forward_hook(lambda m, a, o: seen.append((a[0].shape[1], o.shape[1])))
    images = torch.randn(2, 3, 32, 32)
    logits = model(images, torch.randn(2, 3, 2, 6, 16), torch.randn(2, 3, 2, 6, 16))
    assert logits.shape == (2, 4)
    n = 1 + (32 // 8) ** 2
    assert seen == [(n + 5, n + 5)] * 3                       # each block sees tokens + 5 prompts
    assert model.vit.embed_dim == 32 // 4 and len(model.vit.blocks) == 3
    # the stored K/V reach the logits through the prompts
    other = model(images, torch.randn(2, 3, 2, 6, 16), torch.randn(2, 3, 2, 6, 16))
    assert not torch.allclose(logits, other)


def test_one_out_projector_shared_by_all_layers():
    model = SideNetwork(SPEC)
    projectors = [m for m in model.fusion.modules() if isinstance(m, torch.nn.Linear)]
    assert len(projectors) == 1 and projectors[0].weight.shape == (8, 32)
    assert model.fusion.prompts.shape == (3, 5, 32)


def test_side_only_has_no_fusion_and_ignores_kv():
    model = SideNetwork(ModelSpec(**{**SPEC.as_dict(), "prompts": 0})).eval()
    assert model.fusion is None
    images = torch.randn(2, 3, 32, 32)
    assert model(images).shape == (2, 4)
    keys = torch.randn(2, SPEC.layers, SPEC.lpm_heads, 5, SPEC.head_dim)                 # [B, L, H, k, d]
    torch.testing.assert_close(model(images, keys, 2 * keys), model(images))  # any K/V: the same logits


@pytest.fixture(scope="module")
def vit_b_512_params():
    """The LPM's parameters in the learnable share of a store of the default LPM at 512 px."""
    from fpt.extract import create_backbone
    from fpt.train.model import lpm_parameters

    _, info = create_backbone("vit_base_patch16_384", 512, random_init=True)
    return lpm_parameters(info.as_attrs())


# paper Table 4: learnable share (%) with ViT-B at 512, side 128, reduction 8, 6 layers (a 5-class task's head)
TABLE_4 = {4: 0.96, 8: 0.99, 16: 1.03, 32: 1.11, 64: 1.28, 128: 1.61}


@pytest.mark.parametrize("prompts", sorted(TABLE_4))
def test_learnable_share_equals_paper_table_4(vit_b_512_params, prompts):
    """To the digit: the LPM counted as published (ViT-B/16-384 with its 1000-class head: 86,859,496), as the
    paper counts it; the headless model at 512 px that runs gives 0.97 % and 1.12 % at 4 and 32 prompts."""
    assert vit_b_512_params == 86_859_496
    spec = ModelSpec(lpm_dim=768, lpm_heads=12, head_dim=64, patch_size=16, layers=6, n_classes=5,
                     side_res=128, prompts=prompts, reduction=8)
    ratio = parameter_counts(SideNetwork(spec), vit_b_512_params)["ratio_percent"]
    assert round(ratio, 2) == TABLE_4[prompts], ratio


def test_fpt_fusion_drops_out_the_attention_output_and_adds_its_prompts_whole():
    """The earlier FPT fusion is dropout(out_proj(context)) + p_l: in training the dropout masks the cross-attention
    output only, and the prompts p_l are added after it, whole (never zeroed or scaled by 1/(1-p)). With the
    out-projector zeroed, what reaches the side network is exactly the prompts, in training as in evaluation."""
    from fpt.train.model import FptFusionModule, use_generator

    torch.manual_seed(0)
    fusion = FptFusionModule(layers=3, prompts=5, lpm_dim=32, lpm_heads=2, side_dim=8, dropout=0.5)
    use_generator(fusion, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fusion.out_proj.weight.zero_()
        fusion.out_proj.bias.zero_()
        fusion.prompts.normal_()                        # of order 1 (the init's 1e-6 is below any tolerance)
    keys, values = torch.randn(2, 3, 2, 7, 16), torch.randn(2, 3, 2, 7, 16)
    want = fusion.prompts.detach().expand(2, -1, -1, -1)
    torch.testing.assert_close(fusion.train()(keys, values), want)
    torch.testing.assert_close(fusion.eval()(keys, values), want)


def test_seeded_dropout_draws_from_its_own_generator_only():
    """The fusion's dropout (SeededDropout) with a generator: masks depend on that generator's seed alone, not
    on torch's global generator (which a sweep's runs in threads share); kept values are scaled by 1/(1-p);
    in eval mode it is the identity."""
    import torch

    from fpt.train.model import SeededDropout, use_generator

    x = torch.ones(4000)
    drop = torch.nn.Sequential(SeededDropout(0.25, sample_shape=()))
    use_generator(drop, torch.Generator().manual_seed(7))
    global_state = torch.get_rng_state()
    a = drop(x)
    assert torch.equal(torch.get_rng_state(), global_state)                  # the global generator untouched
    torch.manual_seed(123)                                                    # ... and it does not matter
    use_generator(drop, torch.Generator().manual_seed(7))
    assert torch.equal(drop(x), a)
    use_generator(drop, torch.Generator().manual_seed(8))
    assert not torch.equal(drop(x), a)
    assert torch.equal(a.unique(), torch.tensor([0.0, 1 / 0.75])) and abs((a == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(drop.eval()(x), x)


def test_side_block_l_gets_the_prompts_of_layer_l():
    """Each side block l sees, after its own tokens, exactly the fused prompts of layer l
    (``fusion(keys, values)[:, l]``), not those of another layer: every layer has its own prompts (paper Sec. 3.3).
    Eval mode, so the fusion's dropout is off and the two calls of the fusion agree."""
    torch.manual_seed(0)
    model = SideNetwork(SPEC).eval()
    with torch.no_grad():
        model.fusion.prompts.normal_()                        # layers' prompts far apart (the init is ~1e-6)
    inputs = []
    for block in model.vit.blocks:
        block.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    keys, values = torch.randn(2, 3, 2, 6, 16), torch.randn(2, 3, 2, 6, 16)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), keys, values)
        prompts = model.fusion(keys, values)                  # [B, L, P, D_side]
    assert SPEC.layers >= 2 and len(inputs) == SPEC.layers
    for layer, seen in enumerate(inputs):
        torch.testing.assert_close(seen[:, -SPEC.prompts:], prompts[:, layer])
    assert not torch.allclose(prompts[:, 0], prompts[:, 1])  # so a mix-up of layers would show


@pytest.mark.parametrize("method", ["fpt+", "fpt", "side-only"])
def test_side_network_equals_a_plain_vit_forward(method):
    """The side network's logits against a plain reference: side-only is timm's own ViT forward (patch embedding,
    blocks, the final norm, the head); with prompts (fpt+, fpt) a hand-written loop that appends layer l's fused
    prompts before block l and drops them after it, then timm's final norm and head."""
    torch.manual_seed(0)
    model = SideNetwork(ModelSpec(**{**SPEC.as_dict(), "method": method,
                                     "prompts": 0 if method == "side-only" else SPEC.prompts})).eval()
    vit = model.vit
    with torch.no_grad():
        vit.norm.weight.normal_()                             # the final norm away from the identity-like init
        vit.norm.bias.normal_()
    images = torch.randn(2, 3, 32, 32)
    keys, values = torch.randn(2, 3, 2, 6, 16), torch.randn(2, 3, 2, 6, 16)
    with torch.no_grad():
        if model.fusion is None:
            expected = vit(images)
            logits = model(images)
        else:
            prompts = model.fusion(keys, values)
            x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
            for layer, block in enumerate(vit.blocks):
                n = x.shape[1]
                x = block(torch.cat([x, prompts[:, layer]], dim=1))[:, :n]
            expected = vit.forward_head(vit.norm(x))
            logits = model(images, keys, values)
    torch.testing.assert_close(logits, expected)
