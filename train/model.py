"""The trainable models, one per method, all fed from the store (paper Sec. 3.2-3.4):

- ``fpt+``: the side network with fine-grained prompts of the LPM's width, LayerNorm'd as the query (FPT+).
- ``fpt``: the earlier FPT fusion (prompts of the side width, a learnable input projection to the LPM's width as
  the query, no LayerNorm).
- ``side-only``: the same side network without prompts (no LPM knowledge).
- ``linear-probe``: a linear head on the LPM's stored final class token.

Side networks are timm ViTs built from timm's own blocks.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fpt.config import resolve_method

PROMPT_INIT_STD = 1e-6    # the published FPT+ init: the first cross-attention is nearly uniform over the tokens


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
    prompts: int = 16     # fine-grained prompts per layer (0 for side-only / linear-probe)
    reduction: int = 8
    dropout: float = 0.5
    method: str = "fpt+"  # one of METHODS; "fpt+" with 0 prompts means "side-only"

    def __post_init__(self) -> None:
        self.method, self.prompts = resolve_method(self.method, self.prompts)

    @property
    def side_dim(self) -> int:
        return self.lpm_dim // self.reduction

    @property
    def side_heads(self) -> int:
        return self.lpm_heads if self.side_dim % self.lpm_heads == 0 else 1

    @property
    def inputs(self) -> tuple[str, ...]:
        """The store arrays the model reads (besides ``labels``)."""
        return {"fpt+": ("images", "keys", "values"), "fpt": ("images", "keys", "values"),
                "side-only": ("images",), "linear-probe": ("cls",)}[self.method]

    def as_dict(self) -> dict:
        return asdict(self)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., P, H*d] -> [..., H, P, d]"""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def prompt_attention(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The prompts' attention over the selected tokens: softmax(q_h · k_h / sqrt(d)) per layer and head.

    query [L, P, H*d] (the fusion module's ``query()``), keys [B, L, H, k, d] -> weights [B, L, H, P, k].
    """
    q = split_heads(query, keys.shape[2]).to(keys.dtype)                          # [L, H, P, d]
    return torch.softmax(q @ keys.transpose(-1, -2) / keys.shape[-1] ** 0.5, dim=-1)


class SeededDropout(nn.Module):
    """Dropout that draws its masks from ``generator`` (the run's own, on the model's device; set by
    ``use_generator``) instead of torch's global one, which the concurrent runs of one process (a sweep's
    threads) would share: a run's masks then depend on its seed alone. Without a generator, ``nn.Dropout``.

    forward(x [B, *sample_shape]) -> x with elements zeroed with probability p, the rest scaled by 1/(1-p).

    With ``draws_ahead`` set (by a ``TrainStep`` that compiles), forward uses the mask that ``draw_ahead(B)`` drew
    before it: the step draws there, outside the compiled function, because dynamo cannot trace a random op
    given an explicit generator and would break the graph at it. Either way a run's masks are the same draws.
    """

    def __init__(self, p: float, sample_shape: tuple[int, ...]):
        super().__init__()
        self.p, self.sample_shape = p, tuple(sample_shape)
        self.generator: torch.Generator | None = None
        self.draws_ahead = False
        self.register_buffer("keep", None, persistent=False)      # the drawn-ahead mask [B, *sample_shape]
        # one mask tensor per batch size, drawn into in place and never freed: a compiled function sees one input,
        # and a captured step, which writes into the tensor it captured, keeps it while a partial batch runs
        self._masks: dict[int, torch.Tensor] = {}

    def draw_ahead(self, batch_size: int) -> None:
        """Draw the mask of the next training forward, of ``batch_size`` samples."""
        if self.generator is None or self.p == 0:
            return
        if batch_size not in self._masks:
            self._masks[batch_size] = torch.empty((batch_size, *self.sample_shape), device=self.generator.device)
        self.keep = self._masks[batch_size]
        self.keep.bernoulli_(1 - self.p, generator=self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.generator is None:
            return F.dropout(x, self.p, training=True)
        if self.draws_ahead:
            if self.keep is None or self.keep.shape != x.shape:
                raise RuntimeError(f"SeededDropout: no mask drawn ahead for an input of shape {tuple(x.shape)}")
            keep = self.keep
        else:
            keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, sample_shape={self.sample_shape}"


def use_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Every ``SeededDropout`` of ``model`` draws from ``generator``."""
    for m in seeded_dropouts(model):
        m.generator = generator


def seeded_dropouts(model: nn.Module) -> list[SeededDropout]:
    return [m for m in model.modules() if isinstance(m, SeededDropout)]


class PromptFusion(nn.Module):
    """Cross-attention of per-layer prompt queries over the stored K/V, with no projections on K/V.

    Subclasses define ``query() -> [L, P, D]`` and how the context becomes the prompts the side network sees.
    """

    def __init__(self, layers: int, prompts: int, prompt_dim: int, lpm_heads: int, side_dim: int, dropout: float):
        super().__init__()
        self.heads = lpm_heads
        self.prompts = nn.Parameter(torch.empty(layers, prompts, prompt_dim))     # [L, P, prompt_dim]
        nn.init.normal_(self.prompts, std=PROMPT_INIT_STD)
        self.dropout = SeededDropout(dropout, (layers, prompts, side_dim))             # on [B, L, P, D_side]

    def query(self) -> torch.Tensor:
        raise NotImplementedError

    def context(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """keys, values [B, L, H, k, d] -> attention output [B, L, P, H*d] (heads concatenated)."""
        B = keys.shape[0]
        q = split_heads(self.query(), self.heads).to(keys.dtype)                  # [L, H, P, d]
        out = F.scaled_dot_product_attention(q.expand(B, -1, -1, -1, -1), keys, values)   # [B, L, H, P, d]
        return out.transpose(2, 3).flatten(-2)


class FusionModule(PromptFusion):
    """FPT+ fusion: fine-grained prompts and their cross-attention over the LPM's stored K/V, all layers at once.

    Each side layer l has its own prompts p_l [P, D]. As in the paper (eqs. 7-8) and its public code, the query
    is LayerNorm(p_l) split into the LPM's H heads, attending over the selected keys/values with no extra
    projections; the output is out_proj(context + p_l) -> [P, D_side], then dropout. The LayerNorm and the
    out-projector are shared by all layers.

    forward(keys [B, L, H, k, d], values [B, L, H, k, d]) -> prompts [B, L, P, D_side]
    """

    def __init__(self, layers: int, prompts: int, lpm_dim: int, lpm_heads: int, side_dim: int, dropout: float = 0.5):
        super().__init__(layers, prompts, lpm_dim, lpm_heads, side_dim, dropout)
        self.norm = nn.LayerNorm(lpm_dim)
        self.out_proj = nn.Linear(lpm_dim, side_dim)

    def query(self) -> torch.Tensor:
        return self.norm(self.prompts)                                            # LN(p) [L, P, D]

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_proj(self.context(keys, values) + self.prompts))


class FptFusionModule(PromptFusion):
    """The earlier FPT fusion: prompts p_l [P, D_side] of the side network's width; the query is a learnable
    input projection in_proj(p_l) -> [P, D] (no LayerNorm), split into the LPM's heads; the output is
    dropout(out_proj(context)) + p_l -> [P, D_side]. in_proj and out_proj are shared by all layers.

    forward(keys [B, L, H, k, d], values [B, L, H, k, d]) -> prompts [B, L, P, D_side]
    """

    def __init__(self, layers: int, prompts: int, lpm_dim: int, lpm_heads: int, side_dim: int, dropout: float = 0.5):
        super().__init__(layers, prompts, side_dim, lpm_heads, side_dim, dropout)
        self.in_proj = nn.Linear(side_dim, lpm_dim)
        self.out_proj = nn.Linear(lpm_dim, side_dim)

    def query(self) -> torch.Tensor:
        return self.in_proj(self.prompts)                                         # [L, P, D]

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_proj(self.context(keys, values))) + self.prompts


class SideNetwork(nn.Module):
    """A small timm ViT (width D/reduction, depth L) that sees the low-res image; with prompts (fpt+, fpt) the
    fused prompts of layer l are appended to its sequence before block l and removed after it.

    forward(images [B, 3, r, r], keys/values [B, L, H, k, d] or None) -> logits [B, n_classes]
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.vit = VisionTransformer(img_size=spec.side_res, patch_size=spec.patch_size, embed_dim=spec.side_dim,
                                     depth=spec.layers, num_heads=spec.side_heads, num_classes=spec.n_classes)
        fusion = {"fpt+": FusionModule, "fpt": FptFusionModule}.get(spec.method)
        self.fusion = (fusion(spec.layers, spec.prompts, spec.lpm_dim, spec.lpm_heads, spec.side_dim, spec.dropout)
                       if fusion is not None else None)

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

    def forward_batch(self, batch: dict[str, torch.Tensor],
                      side_images: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A batch of store arrays (images uint8 [B, 3, R, R], keys/values fp16) -> logits [B, C]."""
        images = side_images(batch["images"])
        if self.fusion is None:
            return self(images)
        return self(images, batch["keys"].float(), batch["values"].float())


class LinearProbe(nn.Module):
    """Linear probing: one linear layer on the LPM's final normalised class token.

    forward(cls [B, D]) -> logits [B, n_classes]
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.head = nn.Linear(spec.lpm_dim, spec.n_classes)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.head(cls)

    def forward_batch(self, batch: dict[str, torch.Tensor],
                      side_images: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self(batch["cls"].float())


def build_model(spec: ModelSpec) -> SideNetwork | LinearProbe:
    return LinearProbe(spec) if spec.method == "linear-probe" else SideNetwork(spec)


_INIT_LOCK = threading.Lock()


def seeded_model(spec: ModelSpec, seed: int) -> SideNetwork | LinearProbe:
    """``build_model`` (on the CPU) with its initial weights drawn from torch's CPU generator seeded with
    ``seed``; under a lock, so that runs sharing a process (a sweep's threads) start as they would alone."""
    with _INIT_LOCK:
        torch.default_generator.manual_seed(seed)
        return build_model(spec)


def lpm_parameters(backbone: dict) -> int:
    """The LPM's parameters in the learnable share, from a store's ``backbone`` attributes: as timm publishes
    the model (``published_params``, the paper's count), else (stores from before it was recorded) as it runs."""
    return backbone.get("published_params") or backbone["n_params"]


def parameter_counts(model: nn.Module, lpm_params: int) -> dict[str, float]:
    """Learnable parameters, total (learnable + the frozen LPM's) and the learnable share in percent."""
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = learnable + lpm_params
    return {"learnable": learnable, "lpm": lpm_params, "total": total, "ratio_percent": 100.0 * learnable / total}
