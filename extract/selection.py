"""Important-token selection (paper Sec. 3.5), computed blockwise so N x N attention never exists at once."""
from __future__ import annotations

import math
import warnings

import torch


def num_selected(n_tokens: int, token_ratio: float) -> int:
    """k = floor(N * token_ratio), at least 1; N counts the class token."""
    return max(1, math.floor(n_tokens * token_ratio + 1e-9))


BACKENDS = ("auto", "torch", "triton")
# Largest score tile of the CPU path (32 MiB fp32). Larger tiles were ~2x slower per core at N=4097 (fresh pages
# for every block); much smaller ones add a thread synchronisation per op and block, slower on a busy machine.
CPU_TILE_ELEMENTS = 1 << 23


def token_importance(q: torch.Tensor, k: torch.Tensor, scale: float, mode: str = "global",
                     query_block: int = 256, backend: str = "auto", lse: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every token for every head.

    q, k: [B, H, N, d]. Returns [B, H, N] float32.

    ``global``: mean over all queries i (class token included) of softmax_j(q_i . k_j * scale).
    ``cls``:    the class token's attention row, softmax_j(q_0 . k_j * scale).

    ``backend`` (``global`` only): ``triton`` is the fused kernel of ``fpt.extract.importance_kernel`` (no score
    tiles in memory; CUDA tensors, or any under TRITON_INTERPRET=1); ``torch`` accumulates column sums over
    blocks of at most ``query_block`` queries, so peak memory is O(B * H * query_block * N) instead of
    O(B * H * N^2); ``auto`` is triton for CUDA tensors when triton is importable, torch otherwise.
    ``lse`` (optional, [B, H, N]): the rows' logsumexp_j(scale * q_i . k_j) as the attention computed it
    (``fpt.extract.attention_lse``); the triton kernel then skips its first pass, the torch path ignores it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown importance backend {backend!r}: choose one of {BACKENDS}")
    if mode == "cls":
        return torch.softmax((q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1), dim=-1)[:, :, 0]
    if mode != "global":
        raise ValueError(f"unknown importance mode {mode!r}")
    if backend == "triton":
        return _importance_triton(q, k, scale, lse)
    if uses_triton(q, backend):
        try:
            return _importance_triton(q, k, scale, lse)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:     # e.g. a GPU triton cannot compile for: the torch path still works there
            _disable_triton(e)
    return _importance_torch(q, k, scale, query_block)


def _importance_torch(q: torch.Tensor, k: torch.Tensor, scale: float, query_block: int) -> torch.Tensor:
    """``global`` importance by blocks of queries. q, k: [B, H, N, d] -> [B, H, N] float32."""
    B, H, N, _ = q.shape
    block = query_block
    if not q.is_cuda:
        block = min(query_block, max(16, CPU_TILE_ELEMENTS // (B * H * N)))
    kt = k.float().transpose(-2, -1)                                   # [B, H, d, N]
    total = torch.zeros(B, H, N, dtype=torch.float32, device=q.device)
    for start in range(0, N, block):
        rows = q[:, :, start:start + block].float() * scale            # [B, H, b, d]; scaling q, not the scores
        total += torch.softmax(rows @ kt, dim=-1).sum(dim=-2)
    return total / N


_triton_state: dict[str, object] = {}


def _triton_usable() -> bool:
    """triton imports and has not failed before in this process."""
    if "usable" not in _triton_state:
        try:
            import fpt.extract.importance_kernel  # noqa: F401
            _triton_state["usable"] = True
        except ImportError:
            _triton_state["usable"] = False
    return bool(_triton_state["usable"])


def _disable_triton(error: Exception) -> None:
    _triton_state["usable"] = False
    warnings.warn(f"the triton importance kernel failed ({type(error).__name__}: {error}); "
                  "using the torch path from now on", RuntimeWarning, stacklevel=3)


def uses_triton(x: torch.Tensor, backend: str) -> bool:
    """Whether ``global`` importance of tensors like ``x`` runs the triton kernel under ``backend``."""
    return backend == "triton" or (backend == "auto" and x.is_cuda and _triton_usable())


def _importance_triton(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor | None = None
                       ) -> torch.Tensor:
    from fpt.extract.importance_kernel import global_importance_triton, interpreting

    if not (q.is_cuda or interpreting()):
        raise ValueError("the triton importance backend needs CUDA tensors (or TRITON_INTERPRET=1)")
    return global_importance_triton(q, k, scale, lse)


def select_important_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, token_ratio: float,
                            mode: str = "global", query_block: int = 256, backend: str = "auto",
                            lse: torch.Tensor | None = None):
    """Top-k tokens per head by importance, and their keys and values.

    q, k, v: [B, H, N, d]. Returns (indices [B, H, k] int64 in descending importance, keys [B, H, k, d],
    values [B, H, k, d]). ``backend``, ``lse``: see ``token_importance``.
    """
    n_keep = num_selected(k.shape[2], token_ratio)
    scores = token_importance(q, k, scale, mode, query_block, backend, lse)
    indices = scores.topk(n_keep, dim=-1).indices                      # [B, H, k]
    gather = indices.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return indices, k.gather(2, gather), v.gather(2, gather)
