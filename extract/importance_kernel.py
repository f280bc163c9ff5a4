"""Fused Triton kernel for "global" token importance: column means of softmax(scale * q k^T) without score tiles.

importance[b, h, j] = 1/N * sum_i exp(scale * q_i . k_j - lse_i),  lse_i = logsumexp_j(scale * q_i . k_j)

Two passes, both flash-style (scores only ever live in registers):

- pass 1, one program per (query tile, batch*head): lse_i by an online max/sum over key tiles;
- pass 2, one program per (key tile, batch*head): loop over all query tiles, add the column sums of
  p = exp(s - lse) into registers and store them once; no atomics, so the result is deterministic.

Logits are kept in base 2 (log2(e) folded into the scale) so that ``exp2`` replaces ``exp``. Inputs may be
fp32, bf16 or fp16; dot products and accumulators are fp32. Any strides are accepted, so the views of timm's
fused qkv output need no copy.

This module imports triton at import time: import it lazily (``fpt.extract.selection`` does).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1, set before triton is imported
    (triton builds its own library functions, tl.sum etc., at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _row_lse_kernel(Q, K, LSE, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn,
                    stride_kd, H, N, qk_scale, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """LSE[bh, i] = log2 sum_j exp2(qk_scale * q_i . k_j), for the BLOCK_Q queries of this program."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, D_PAD)
    q = tl.load(q_base + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)                  # [BLOCK_Q, D_PAD]
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    for start in range(0, N, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        kt = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
                     mask=(cols[None, :] < N) & (dims[:, None] < D), other=0.0)             # [D_PAD, BLOCK_K]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                           # [BLOCK_Q, BLOCK_K]
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))     # finite: every key tile holds at least one real key
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
    tl.store(LSE + bh.to(tl.int64) * N + rows, m + tl.log2(l), mask=rows < N)


def _column_mean_kernel(Q, K, LSE, OUT, stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh,
                        stride_kn, stride_kd, H, N, qk_scale, D: tl.constexpr, D_PAD: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    """OUT[bh, j] = 1/N sum_i exp2(qk_scale * q_i . k_j - LSE[bh, i]), for the BLOCK_K keys of this program."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    lse_base = LSE + bh.to(tl.int64) * N
    cols = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, D_PAD)
    kt = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
                 mask=(cols[None, :] < N) & (dims[:, None] < D), other=0.0)                 # [D_PAD, BLOCK_K]
    if UPCAST:
        kt = kt.to(tl.float32)
    # elementwise accumulation; one reduction over queries at the end instead of a cross-warp one per tile
    acc = tl.zeros([BLOCK_Q, BLOCK_K], tl.float32)
    for start in range(0, N, BLOCK_Q):
        rows = start + tl.arange(0, BLOCK_Q)
        q = tl.load(q_base + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
                    mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)              # [BLOCK_Q, D_PAD]
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(lse_base + rows, mask=rows < N, other=float("inf"))  # padded rows: exp2(-inf) = 0
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        acc += tl.exp2(s - lse[:, None])
    # padded key columns hold garbage sums; they are simply not stored
    tl.store(OUT + bh.to(tl.int64) * N + cols, tl.sum(acc, axis=0) / N, mask=cols < N)


@functools.cache
def _kernels():
    """The two kernels, jitted (or wrapped for the interpreter: triton.jit decides from TRITON_INTERPRET)."""
    return triton.jit(_row_lse_kernel), triton.jit(_column_mean_kernel)


def launch_config(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Fixed tile sizes per head_dim and input dtype: compiled for sm_80/sm_90 without register spills, within
    ~100 KiB of shared memory, but not tuned on hardware yet.

    BLOCK_Q x BLOCK_K score tiles stay in registers; the stationary tile of each pass is the larger one. Pass 2
    also holds a BLOCK_Q x BLOCK_K fp32 accumulator, hence 8 warps. fp32 inputs (3 tf32 products per dot) get
    smaller tiles.
    """
    big = max(16, triton.next_power_of_2(head_dim)) > 64
    if dtype == torch.float32:
        warps = 8 if big else 4
        return {"lse": dict(BLOCK_Q=64, BLOCK_K=32, num_warps=warps, num_stages=2),
                "col": dict(BLOCK_Q=32, BLOCK_K=64, num_warps=warps, num_stages=2)}
    return {"lse": dict(BLOCK_Q=128, BLOCK_K=64, num_warps=8 if big else 4, num_stages=2 if big else 3),
            "col": dict(BLOCK_Q=64, BLOCK_K=128, num_warps=8, num_stages=2 if big else 3)}


def global_importance_triton(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor | None = None,
                             config: dict | None = None) -> torch.Tensor:
    """Mean over queries of softmax_j(scale * q_i . k_j), per token j and head.

    q, k: [B, H, N, d], same dtype (fp32, bf16 or fp16), any strides, on CUDA (or on CPU under
    TRITON_INTERPRET=1). lse: optional [B, H, N] natural-log logsumexp_j(scale * q_i . k_j) of the rows, as
    returned by flash/efficient attention (slice off any padding of N); given, pass 1 is skipped.
    config: overrides ``launch_config``
    (e.g. small tiles in tests). Returns [B, H, N] float32.
    """
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype:
        q, k = (t.to(torch.promote_types(q.dtype, k.dtype)) for t in (q, k))
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        q, k = q.float(), k.float()
    B, H, N, d = q.shape
    if B * H > 65535:                        # the grid's second axis
        raise ValueError(f"B * H = {B * H} is more than the kernel's 65535 (batch, head) pairs: split the batch")
    cfg = config or launch_config(d, q.dtype)
    row_lse, column_mean = _kernels()
    # triton's interpreter multiplies the raw bits of bf16 in tl.dot: it gets exact fp32 copies instead
    upcast = interpreting() and q.dtype == torch.bfloat16
    common = dict(D=d, D_PAD=max(16, triton.next_power_of_2(d)), UPCAST=upcast,
                  PRECISION="tf32x3" if q.dtype == torch.float32 or upcast else "tf32")
    strides_and_sizes = (*q.stride(), *k.stride(), H, N, scale * LOG2E)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():   # launch on q's GPU
        if lse is None:
            lse2 = torch.empty(B * H, N, dtype=torch.float32, device=q.device)
            c = cfg["lse"]
            row_lse[(triton.cdiv(N, c["BLOCK_Q"]), B * H)](q, k, lse2, *strides_and_sizes, **common, **c)
        else:
            lse2 = (lse.float() * LOG2E).reshape(B * H, N).contiguous()
        out = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
        c = cfg["col"]
        column_mean[(triton.cdiv(N, c["BLOCK_K"]), B * H)](q, k, lse2, out, *strides_and_sizes, **common, **c)
    return out
