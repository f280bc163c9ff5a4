"""The frozen LPM: captured K/V are the ones inside timm's attention; weights loading; bad backbones."""
import pytest
import timm
import torch

from fpt import FptError
from fpt.extract import FrozenLPM, create_backbone
from tests.conftest import MICRO
from tests.helpers import assert_is_topk, reference_qkv


@pytest.mark.parametrize("mode", ["global", "cls"])
def test_captured_kv_equal_timm_attention_kv(mode):
    model, info = create_backbone(MICRO, 64, random_init=True)
    layers = [1, 3]
    lpm = FrozenLPM(model, layers, token_ratio=0.25, importance=mode, query_block=5)
    images = torch.randn(2, 3, 64, 64)
    out = lpm(images)
    ref = reference_qkv(model, images, layers)
    k_sel = lpm.n_selected(64)
    assert k_sel == int(65 * 0.25)
    assert out["keys"].shape == (2, 2, info.heads, k_sel, info.head_dim)
    for i, l in enumerate(layers):
        q, k, v, probs, naive_out, timm_out = ref[l]
        torch.testing.assert_close(naive_out, timm_out, rtol=1e-4, atol=1e-5)   # these q/k/v are timm's
        importance = probs.mean(-2) if mode == "global" else probs[:, :, 0]     # [B, H, N]
        assert_is_topk(out["indices"][:, i], importance, k_sel)
        gather = out["indices"][:, i].unsqueeze(-1).expand(-1, -1, -1, info.head_dim)
        torch.testing.assert_close(out["keys"][:, i], k.gather(2, gather))
        torch.testing.assert_close(out["values"][:, i], v.gather(2, gather))
        # what the store keeps: fp16
        torch.testing.assert_close(out["keys"][:, i].half().float(), k.gather(2, gather), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        cls = model.forward_features(images)[:, 0]
    torch.testing.assert_close(out["cls"], cls)


def test_local_weights_file_loads_and_resamples_pos_embed(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model(MICRO, num_classes=5)                 # trained at 64 px, with a head
    torch.save(source.state_dict(), tmp_path / "w.pth")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    m1, i1 = create_backbone(MICRO, 64, weights=tmp_path / "w.pth")
    m2, i2 = create_backbone(MICRO, 64, weights=tmp_path / "w.safetensors")
    assert i1.weights_sha256 == i2.weights_sha256 and not i1.random_init
    torch.testing.assert_close(m1.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    m3, _ = create_backbone(MICRO, 96, weights=tmp_path / "w.pth")   # 8x8 -> 12x12 patch grid
    assert m3.pos_embed.shape[1] == 1 + 12 * 12
    _, rand = create_backbone(MICRO, 64, random_init=True)
    assert rand.weights_sha256 != i1.weights_sha256 and rand.weights_source == "random-init"


def test_a_weights_file_fills_an_empty_model_without_a_random_init(tmp_path, monkeypatch):
    """A ViT whose every tensor the file holds is built empty (no random init drawn to be overwritten) and
    equals the file's weights in every tensor; a file missing one tensor is refused, never left as garbage."""
    source = timm.create_model(MICRO, num_classes=0, img_size=64)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    real, built = timm.create_model, []
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: built.append(kw.get("device")) or real(*a, **kw))
    model, info = create_backbone(MICRO, 64, weights=tmp_path / "w.pth")
    assert built and set(built) == {"meta"}     # empty models only (the skeleton, the published count): no init
    assert model.state_dict().keys() == source.state_dict().keys()
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert info.weights_source == "file:w.pth" and all(p.device.type == "cpu" for p in model.parameters())
    partial = {k: v for k, v in source.state_dict().items() if k != "blocks.1.norm1.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(FptError, match="missing .*blocks.1.norm1.weight"):
        create_backbone(MICRO, 64, weights=tmp_path / "partial.pth")


def test_random_init_is_reproducible():
    _, a = create_backbone(MICRO, 64, random_init=True)
    _, b = create_backbone(MICRO, 64, random_init=True)
    assert a.weights_sha256 == b.weights_sha256


@pytest.mark.parametrize("name,res,message", [
    ("no_such_vit", 64, "unknown backbone"),
    (MICRO, 60, "not a multiple of the patch size 8"),
])
def test_bad_backbone_requests_are_clear(name, res, message):
    with pytest.raises(FptError, match=message):
        create_backbone(name, res, random_init=True)


def test_bad_weights_file_is_clear(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FptError, match="cannot read weights file"):
        create_backbone(MICRO, 64, weights=tmp_path / "bad.pth")
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(FptError, match="does not match"):
        create_backbone(MICRO, 64, weights=tmp_path / "other.pth")


def test_layers_past_the_depth_are_refused_before_any_weights_are_read(tmp_path):
    unreadable = tmp_path / "w.pth"
    unreadable.write_bytes(b"not weights")
    with pytest.raises(FptError, match=r"--layers \[2, 9\]: .* has layers 0-3"):
        create_backbone(MICRO, 64, weights=unreadable, layers=[2, 9])
    with pytest.raises(FptError, match="cannot read weights file"):             # the same file, layers in range
        create_backbone(MICRO, 64, weights=unreadable, layers=[2, 3])


def test_pretrained_weights_with_the_hub_unreachable_come_from_the_cache_alone(tmp_path, monkeypatch):
    """A hub whose name does not resolve is not retried (huggingface_hub's back-off: ~46 s): the cache is looked
    in at once, and the one-line error says why; the hub's offline switch is as it was afterwards."""
    import socket

    import huggingface_hub.constants as hub_constants

    import fpt.extract.backbone as backbone

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def no_such_name(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    slept = []                                      # huggingface_hub's back-off between tries, not waited
    monkeypatch.setattr(backbone.socket, "getaddrinfo", no_such_name)
    monkeypatch.setattr("time.sleep", slept.append)
    offline = hub_constants.HF_HUB_OFFLINE
    with pytest.raises(FptError, match="huggingface.co cannot be reached: its name does not resolve") as e:
        create_backbone("vit_tiny_patch16_224", 224)
    assert "\n" not in str(e.value) and "--random-init" in str(e.value)
    assert slept == [] and hub_constants.HF_HUB_OFFLINE is offline

    monkeypatch.setattr(backbone.socket, "getaddrinfo", lambda host, *args, **kwargs: [])    # it resolves
    with backbone.hub_cache_only_unless_reachable(True) as reachable:
        assert reachable and hub_constants.HF_HUB_OFFLINE is offline
