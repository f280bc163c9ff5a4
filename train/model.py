"""The side network with fine-grained prompts (paper Sec. 3.2-3.4), built from timm's own ViT blocks."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


@dataclass
class ModelSpec:
    """Everything needed to rebuild the model (stored in every checkpoint)."""
    lpm_dim: int          # D, the LPM's width
    lpm_heads: int        # H
    head_dim: int         # d
    patch_size: int
    layers: int           # L: extracted LPM layers = side depth
    n_classes: int
    side_res: int = 128
    prompts: int = 16     # 0 = side network alone
    reduction: int = 8
    dropout: float = 0.5

    @property
    def side_dim(self) -> int:
        return self.lpm_dim // self.reduction

    @property
    def side_heads(self) -> int:
        return self.lpm_heads if self.side_dim % self.lpm_heads == 0 else 1

    def as_dict(self) -> dict:
        return asdict(self)


class FusionModule(nn.Module):
    """Fine-grained prompts and their cross-attention over the LPM's stored K/V, for every side layer at once.

    Each side layer l has its own prompts p_l [P, D]. As in the paper (eqs. 7-8) and its public code, the query
    is LayerNorm(p_l) split into the LPM's H heads, attending over the selected keys/values with no extra
    projections; the output is out_proj(context + p_l) -> [P, D_side], then dropout. The LayerNorm and the
    out-projector are shared by all layers.

    forward(keys [B, L, H, k, d], values [B, L, H, k, d]) -> prompts [B, L, P, D_side]
    """

    def __init__(self, layers: int, prompts: int, lpm_dim: int, lpm_heads: int, side_dim: int, dropout: float = 0.5):
        super().__init__()
        self.heads = lpm_heads
        self.prompts = nn.Parameter(torch.empty(layers, prompts, lpm_dim))
        nn.init.trunc_normal_(self.prompts, std=0.02)
        self.norm = nn.LayerNorm(lpm_dim)
        self.out_proj = nn.Linear(lpm_dim, side_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        B, L, H, _, d = keys.shape
        P = self.prompts.shape[1]
        query = self.norm(self.prompts).view(L, P, H, d).transpose(1, 2)          # [L, H, P, d]
        context = F.scaled_dot_product_attention(query.expand(B, -1, -1, -1, -1).to(keys.dtype), keys, values)
        context = context.transpose(2, 3).reshape(B, L, P, H * d)                 # [B, L, P, D]
        return self.dropout(self.out_proj(context + self.prompts))                # [B, L, P, D_side]


class SideNetwork(nn.Module):
    """A small timm ViT (width D/reduction, depth L) that sees the low-res image; with prompts > 0 the fused
    prompts of layer l are appended to its sequence before block l and removed after it.

    forward(images [B, 3, r, r], keys/values [B, L, H, k, d] or None) -> logits [B, n_classes]
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.vit = VisionTransformer(img_size=spec.side_res, patch_size=spec.patch_size, embed_dim=spec.side_dim,
                                     depth=spec.layers, num_heads=spec.side_heads, num_classes=spec.n_classes)
        self.fusion = (FusionModule(spec.layers, spec.prompts, spec.lpm_dim, spec.lpm_heads, spec.side_dim,
                                    spec.dropout) if spec.prompts > 0 else None)

    def forward(self, images: torch.Tensor, keys: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))                 # [B, 1 + n, D_side]
        prompts = self.fusion(keys, values) if self.fusion is not None else None  # [B, L, P, D_side]
        for layer, block in enumerate(vit.blocks):
            if prompts is None:
                x = block(x)
            else:
                n = x.shape[1]
                x = block(torch.cat([x, prompts[:, layer]], dim=1))[:, :n]         # prompts removed after the layer
        return vit.forward_head(vit.norm(x))


def parameter_counts(model: nn.Module, lpm_params: int) -> dict[str, float]:
    """Learnable parameters, total (learnable + the frozen LPM's) and the learnable share in percent."""
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = learnable + lpm_params
    return {"learnable": learnable, "lpm": lpm_params, "total": total, "ratio_percent": 100.0 * learnable / total}
