"""The attention's own row log-sum-exp, so that "global" importance needs one pass over the scores, not two.

The fused kernel (``importance_kernel``) needs ``lse_i = logsumexp_j(scale * q_i . k_j)`` for every query; its
pass 1 recomputes what the model's attention has already computed. ``AttentionLse`` is a torch function mode
that ``FrozenLPM`` enters around its forward: for the layers it names, a call of
``F.scaled_dot_product_attention`` runs the very kernel SDPA would dispatch to (torch's own choice: flash,
memory-efficient or cuDNN; on a CPU, flash for CPU) asking it for the log-sum-exp as well, and returns that
kernel's output. The first call in a process compares the result with SDPA's own output bit for bit; if they
differ (a kernel that computes differently when asked for the log-sum-exp), the mode stands aside for the rest
of the process with one warning and pass 1 runs as before. Either way the model computes exactly what timm's
attention computes, so the stored K/V are unchanged.

Calls it does not serve, and then leaves to SDPA unchanged: masks, dropout, causal or grouped-query attention,
and any backend other than flash, memory-efficient or cuDNN (e.g. the math fallback).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

# (q, k, v [B, H, N, d] as the attention got them, lse [B, H, N] float32 natural log, the scale it used) -> None
OnLse = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None]

_state: dict[str, bool] = {}     # "identical": the first comparison with SDPA's output in this process


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(SDPA's output [B, H, N, d], lse [B, H, N] float32) from the kernel SDPA itself would choose, or None
    when that choice is one without a log-sum-exp (the math path)."""
    choice = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale, enable_gqa=False))
    n = q.shape[-2]
    if q.device.type == "cpu":
        if choice != SDPBackend.FLASH_ATTENTION:
            return None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    elif choice == SDPBackend.FLASH_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    elif choice == SDPBackend.EFFICIENT_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                          scale=scale)[:2]
    elif choice == SDPBackend.CUDNN_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                      scale=scale)[:2]
    else:
        return None
    return out, lse.reshape(*q.shape[:2], -1)[..., :n].float()    # efficient pads N; cuDNN has a trailing 1


class AttentionLse(TorchFunctionMode):
    """Serves the SDPA call of a layer armed with ``arm(on_lse)``: ``on_lse(q, k, v, lse, scale)`` runs before the
    output returns; a call it cannot serve returns SDPA's output and leaves the layer armed (see ``pending``)."""

    def __init__(self):
        super().__init__()
        self._on_lse: OnLse | None = None
        self.entered = False

    def __enter__(self):
        self.entered = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.entered = False
        return super().__exit__(*exc)

    def arm(self, on_lse: OnLse) -> None:
        self._on_lse = on_lse

    def pending(self) -> bool:
        """Whether the armed layer's SDPA call has not been served (the caller then selects without lse)."""
        return self._on_lse is not None

    def disarm(self) -> None:
        self._on_lse = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self._on_lse is not None and _state.get("identical", True):
            served = self._serve(*args, **kwargs)
            if served is not None:
                return served
        return func(*args, **kwargs)

    def _serve(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa or not q.shape == k.shape == v.shape:
            return None
        with torch._C.DisableTorchFunction():
            result = sdpa_with_lse(q, k, v, scale)
            if result is None:
                return None
            out, lse = result
            if "identical" not in _state:
                _state["identical"] = torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=scale))
                if not _state["identical"]:
                    warnings.warn("the attention kernel computes differently when asked for its log-sum-exp: token "
                                  "importance recomputes it instead (slower, same result)", RuntimeWarning,
                                  stacklevel=2)
                    return None
            on_lse, self._on_lse = self._on_lse, None
            on_lse(q, k, v, lse, q.shape[-1] ** -0.5 if scale is None else scale)
        return out
