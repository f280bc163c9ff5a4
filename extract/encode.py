"""Encoding images with the frozen LPM: the one path from pixels to stored features, used by extraction and by
prediction alike (so a new image is seen exactly as the store's samples were)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import get_worker_info

from fpt import FptError
from fpt.config import resolve_precision
from fpt.extract.backbone import FrozenLPM
from fpt.store import FEATURE_DTYPES


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}    # resolved precision -> dtype


def pixel_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype decoded pixels of a float (16-bit) source travel in to ``encode_batch`` (8-bit ones stay uint8).
    fp16 on CUDA under fp16/bf16 autocast: about as fine as the half-precision input of the LPM's first layer, and
    half the host-to-device traffic. fp32 otherwise: with ``--precision fp32`` a 16-bit source keeps its precision."""
    half = device.type == "cuda" and AUTOCAST[resolve_precision(precision, device)] is not None
    return torch.float16 if half else torch.float32


def stack_pixels(highs: Sequence[torch.Tensor], float_dtype: torch.dtype,
                 stack: Callable[[Sequence[torch.Tensor]], Any] | None = None):
    """LPM inputs [res, res, C] (channels last as decoded; C = 3 RGB or 1 grey; uint8 or float) -> one batch
    [B, res, res, C']: grey kept one channel when every image is grey (C' = 1; ``encode_batch`` makes it RGB on
    the device) else repeated, and uint8 when every image is 8-bit, else ``float_dtype``. The values are those of
    converting each image first. ``stack`` stacks them (default ``stack_batch``; a decode worker's
    ``stack_in_slot``)."""
    if len({h.shape[-1] for h in highs}) > 1:
        highs = [h.expand(-1, -1, 3) for h in highs]
    if any(h.dtype != torch.uint8 for h in highs):
        highs = [h.to(float_dtype) for h in highs]
    return (stack or stack_batch)(highs)


def stack_batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; inside a DataLoader worker straight into shared memory, as torch's own default_collate
    does, so that sending the batch to the main process does not copy it once more (dev box, a batch of 4 RGB
    images: 0.46 -> 0.29 ms per image at 512, 5.4 -> 3.0 at 1024)."""
    if get_worker_info() is None:
        return torch.stack(list(tensors))
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
    return torch.stack(list(tensors), out=first.new(storage).view(len(tensors), *first.shape))


@torch.no_grad()
def encode_batch(lpm: FrozenLPM, high: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 precision: str = "auto") -> dict[str, torch.Tensor]:
    """high: [B, res, res, 3] (channels last, as decoded), or [B, res, res, 1] for grey, in [0, 255] (uint8 or any
    float dtype, any device); mean/std: per channel in [0, 1].

    Returns, on the LPM's device and in the store's dtypes: keys/values [B, L, H, k, d], indices [B, L, H, k],
    cls [B, D]. Runs under ``precision`` autocast (``resolve_precision``), halving the batch when it does not fit.
    """
    device = next(lpm.parameters()).device
    shift, scale = _normalization(tuple(mean), tuple(std), device)
    x = high.to(device, non_blocking=True).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)   # grey -> RGB
    x = ((x - shift) / scale).contiguous()          # [B, 3, res, res]: the transpose is done here, on the device
    out = forward_fitting(lpm, x, device, precision)
    return {name: out[name].to(getattr(torch, dtype)) for name, dtype in FEATURE_DTYPES.items()}


@lru_cache(maxsize=8)
def _normalization(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) x 255 as [1, 3, 1, 1] tensors on ``device``, made once: building them per batch from a list
    would be a blocking host-to-device copy that waits for the previous batch's GPU work."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def forward_fitting(lpm: FrozenLPM, x: torch.Tensor, device: torch.device, precision: str = "auto"
                    ) -> dict[str, torch.Tensor]:
    """The LPM on ``x`` [B, 3, res, res] under ``precision`` autocast (``resolve_precision``: auto is fp16 on
    CUDA, fp32 on a CPU), halving the batch on CUDA out-of-memory."""
    dtype = AUTOCAST[resolve_precision(precision, device)]
    try:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return lpm(x)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(x) == 1:
            raise FptError(f"one image at res {x.shape[-1]} does not fit in GPU memory; lower --res") from None
        half = len(x) // 2
        a, b = forward_fitting(lpm, x[:half], device, precision), forward_fitting(lpm, x[half:], device, precision)
        return {k: torch.cat([a[k], b[k]]) for k in a}
