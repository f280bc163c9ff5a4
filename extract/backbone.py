"""The frozen LPM: building a timm ViT, loading its weights, and running it while capturing top-k K/V."""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from fpt import FptError
from fpt.config import check_res_fits_patch
from fpt.extract.selection import num_selected, select_important_tokens

RANDOM_INIT_SEED = 0


@dataclass
class BackboneInfo:
    name: str
    embed_dim: int
    heads: int
    head_dim: int
    patch_size: int
    depth: int
    prefix_tokens: int
    n_params: int
    weights_sha256: str          # hash of the loaded parameters, whatever their source
    weights_source: str          # "file:<name>", "timm-pretrained" or "random-init"
    random_init: bool

    def as_attrs(self) -> dict:
        return asdict(self)


def create_backbone(name: str, res: int, weights: Path | None = None, random_init: bool = False
                    ) -> tuple[nn.Module, BackboneInfo]:
    """A frozen timm ViT at input side ``res``, in eval mode, without classifier head."""
    if not timm.is_model(name):
        raise FptError(f"unknown backbone {name!r}: give a timm ViT name, e.g. vit_base_patch16_224.augreg_in21k")
    kwargs = dict(num_classes=0, img_size=res)
    try:
        if weights is None and not random_init:
            try:
                model = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as e:
                raise FptError(f"cannot load pretrained weights for {name} ({type(e).__name__}); "
                               "pass --weights FILE or --random-init") from None
            source = "timm-pretrained"
        else:
            with torch.random.fork_rng():
                torch.manual_seed(RANDOM_INIT_SEED)
                model = timm.create_model(name, pretrained=False, **kwargs)
            source = "random-init"
            if weights is not None:
                _load_weights(model, Path(weights))
                source = f"file:{Path(weights).name}"
    except (AssertionError, TypeError) as e:
        raise FptError(f"backbone {name} cannot be built at res {res}: {e}") from None
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None else None
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise FptError(f"backbone {name} is not a plain ViT with fused qkv attention")
    patch = model.patch_embed.patch_size[0]
    check_res_fits_patch(res, patch, name)
    model.eval().requires_grad_(False)
    if random_init:
        warnings.warn(f"{name} is RANDOMLY INITIALISED: the store holds no pre-trained knowledge", stacklevel=2)
    info = BackboneInfo(
        name=name, embed_dim=model.embed_dim, heads=attn.num_heads, head_dim=attn.head_dim, patch_size=patch,
        depth=len(blocks), prefix_tokens=model.num_prefix_tokens,
        n_params=sum(p.numel() for p in model.parameters()),
        weights_sha256=parameters_sha256(model), weights_source=source, random_init=random_init,
    )
    return model, info


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a local timm/torch state dict or .safetensors file, resampling position embeddings to the res."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FptError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FptError(f"weights file {path} does not hold a state dict")
    state = {k: v for k, v in checkpoint_filter_fn(state, model).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise FptError(f"weights file {path} does not match {type(model).__name__}: "
                       f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def parameters_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FrozenLPM(nn.Module):
    """Runs a timm ViT with its own (fused) attention and captures, per chosen layer and head, the K/V of the
    ``token_ratio`` most important tokens.

    forward(images [B, 3, R, R]) -> dict:
        keys, values [B, L, H, k, d]; indices [B, L, H, k]; cls [B, D] (final normalised class token)
    """

    def __init__(self, model: nn.Module, layers: list[int], token_ratio: float, importance: str = "global",
                 query_block: int = 256, importance_backend: str = "auto"):
        super().__init__()
        self.model, self.layers = model, layers
        self.token_ratio, self.importance, self.query_block = token_ratio, importance, query_block
        self.importance_backend = importance_backend     # see token_importance: triton kernel on CUDA by default
        self._captured: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer in layers:
            attn = model.blocks[layer].attn
            attn.qkv.register_forward_hook(self._make_hook(layer, attn))

    def n_selected(self, res: int) -> int:
        grid = res // self.model.patch_embed.patch_size[0]
        return num_selected(grid * grid + self.model.num_prefix_tokens, self.token_ratio)

    def _make_hook(self, layer: int, attn: nn.Module):
        def hook(_module, _inputs, qkv: torch.Tensor):
            # Same reshaping as timm's Attention.forward: [B, N, 3*H*d] -> 3 x [B, H, N, d]
            B, N, _ = qkv.shape
            q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            self._captured[layer] = select_important_tokens(
                q, k, v, attn.scale, self.token_ratio, self.importance, self.query_block, self.importance_backend)
        return hook

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured.clear()
        feats = self.model.forward_features(images)                      # [B, N, D], final norm applied
        cls = self.model.forward_head(feats, pre_logits=True)            # [B, D]
        idx, keys, values = (torch.stack([self._captured[l][i] for l in self.layers], dim=1) for i in range(3))
        self._captured.clear()
        return {"keys": keys, "values": values, "indices": idx, "cls": cls}
