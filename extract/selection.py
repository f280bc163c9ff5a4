"""Important-token selection (paper Sec. 3.5), computed blockwise so N x N attention never exists at once."""
from __future__ import annotations

import math

import torch


def num_selected(n_tokens: int, token_ratio: float) -> int:
    """k = floor(N * token_ratio), at least 1; N counts the class token."""
    return max(1, math.floor(n_tokens * token_ratio + 1e-9))


def token_importance(q: torch.Tensor, k: torch.Tensor, scale: float, mode: str = "global",
                     query_block: int = 256) -> torch.Tensor:
    """Importance of every token for every head.

    q, k: [B, H, N, d]. Returns [B, H, N] float32.

    ``global``: mean over all queries i (class token included) of softmax_j(q_i . k_j * scale).
    ``cls``:    the class token's attention row, softmax_j(q_0 . k_j * scale).

    Column sums are accumulated over blocks of ``query_block`` queries, so peak memory is
    O(B * H * query_block * N) instead of O(B * H * N^2).
    """
    if mode == "cls":
        return torch.softmax((q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1), dim=-1)[:, :, 0]
    if mode != "global":
        raise ValueError(f"unknown importance mode {mode!r}")
    B, H, N, _ = q.shape
    kt = k.float().transpose(-2, -1)                                   # [B, H, d, N]
    total = torch.zeros(B, H, N, dtype=torch.float32, device=q.device)
    for start in range(0, N, query_block):
        block = q[:, :, start:start + query_block].float() * scale     # [B, H, b, d]; scaling q, not the scores
        total += torch.softmax(block @ kt, dim=-1).sum(dim=-2)
    return total / N


def select_important_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, token_ratio: float,
                            mode: str = "global", query_block: int = 256):
    """Top-k tokens per head by importance, and their keys and values.

    q, k, v: [B, H, N, d]. Returns (indices [B, H, k] int64 in descending importance, keys [B, H, k, d],
    values [B, H, k, d]).
    """
    n_keep = num_selected(k.shape[2], token_ratio)
    scores = token_importance(q, k, scale, mode, query_block)
    indices = scores.topk(n_keep, dim=-1).indices                      # [B, H, k]
    gather = indices.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    return indices, k.gather(2, gather), v.gather(2, gather)
