"""Where a fresh process's first FrozenLPM step goes. On an H200 (lease 5) a whole ``fpt extract`` run waited
1.8-2.2 s for it (``warm_up_s``) against a steady step of 24 ms: most of a 1,024-image run's start. Each first
use is timed on its own, in the order extraction meets them, the device synchronised after each, then a second
whole step for comparison.

    python -m fpt.bench.first_step --res 512:32 1024:8

One fresh Python process per res, since a process pays each first use once. Stages (seconds):
``import`` torch, timm and fpt's extraction; ``context`` the device's first tensor; ``build`` the LPM built and
moved to the device; ``patch_embed`` its convolution (on CUDA cuDNN's first use); ``block`` a transformer block
of the LPM's shape without its selection hooks (the fused attention's and the GEMMs' first use);
``lse_attention`` the attention kernel asked for its log-sum-exp on q/k/v of the LPM's shape (``sdpa_with_lse``:
another kernel, or another cuDNN plan, than the plain call); ``importance`` the importance from it
(``token_importance``: on CUDA the Triton kernel's first use, compiled or loaded from Triton's cache);
``first_step`` the whole first ``encode_batch`` after those (the rest); ``low_res_copy``; ``second_step`` the
whole step again. Results: bench/results/first_step-<device>.json.

``--busy-helpers N`` runs each stage beside N processes that keep a core each busy, as ``fpt extract``'s decode
workers do while its first step runs (its warm-up), at each ``--helper-niceness`` (how much lower their CPU
priority is: ``fpt.store.lower_priority``); 0 helpers is the process alone:

    python -m fpt.bench.first_step --res 512:32 --busy-helpers 0 16 --helper-niceness 0 10
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@contextmanager
def busy_helpers(count: int, niceness: int) -> Iterator[list[int]]:
    """``count`` processes (their PIDs), each keeping a core busy at ``niceness`` lower CPU priority, while the
    block runs. Forked before this process imports torch (no CUDA in them)."""
    from fpt.store import lower_priority

    context = multiprocessing.get_context("fork")
    stop = context.Event()
    helpers = [context.Process(target=_spin, args=(lower_priority, niceness, stop), daemon=True)
               for _ in range(count)]
    for helper in helpers:
        helper.start()
    try:
        yield [helper.pid for helper in helpers]
    finally:
        stop.set()
        for helper in helpers:
            helper.join()


def _spin(lower_priority, niceness: int, stop) -> None:
    lower_priority(niceness)
    while not stop.is_set():
        sum(range(100_000))


def first_uses(model: str, res: int, batch: int, device_name: str, helpers: int = 0, niceness: int = 0) -> dict:
    """In this (fresh) process: the seconds of each stage (see the module docstring), beside ``helpers`` busy
    processes at ``niceness``."""
    with busy_helpers(helpers, niceness):
        return {**_first_uses(model, res, batch, device_name), "busy_helpers": helpers, "helper_niceness": niceness}


def _first_uses(model: str, res: int, batch: int, device_name: str) -> dict:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    import torch
    from timm.models.vision_transformer import Block
    from torch.nn.attention import SDPBackend

    from fpt.extract.attention_lse import sdpa_with_lse
    from fpt.extract.backbone import FrozenLPM, create_backbone
    from fpt.extract.encode import encode_batch
    from fpt.extract.images import low_res_copy
    from fpt.extract.run import default_layers
    from fpt.extract.selection import token_importance
    seconds["import"] = time.perf_counter() - t0
    device = torch.device(device_name)

    def timed(stage: str, fn):
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[stage] = time.perf_counter() - start
        return out

    timed("context", lambda: torch.zeros(1, device=device))

    def build() -> FrozenLPM:
        net, info = create_backbone(model, res, random_init=True)
        return FrozenLPM(net, default_layers(info.depth), 0.2, "global").to(device)

    lpm = timed("build", build)
    zeros = torch.zeros(batch, res, res, 3, dtype=torch.uint8, device=device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.no_grad(), torch.autocast(device.type, dtype=half):
        x = torch.zeros(batch, 3, res, res, device=device)
        tokens = timed("patch_embed", lambda: lpm.model.patch_embed(x))
        tokens = lpm.model._pos_embed(tokens)
        # a block of the same shape without the LPM's selection hooks: the attention's and GEMMs' first use only
        block = Block(lpm.model.embed_dim, lpm.model.blocks[0].attn.num_heads).to(device).eval()
        timed("block", lambda: block(tokens))
        # the selection's own first uses, apart: the attention asked for its log-sum-exp (another kernel, or
        # another cuDNN plan, than SDPA's plain call), then the importance from it (on CUDA the Triton kernel)
        heads = lpm.model.blocks[0].attn.num_heads
        q, k, v = torch.randn(3, batch, heads, tokens.shape[1], lpm.model.embed_dim // heads, device=device,
                              dtype=half).unbind(0)
        served = timed("lse_attention", lambda: sdpa_with_lse(q, k, v))
        backend = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False)).name     # SDPA's pick here
        lse = served[1] if served is not None else None
        timed("importance", lambda: token_importance(q, k, q.shape[-1] ** -0.5, "global", lse=lse))
    timed("first_step", lambda: encode_batch(lpm, zeros, MEAN, STD))
    timed("low_res_copy", lambda: low_res_copy(zeros, 128))
    timed("second_step", lambda: encode_batch(lpm, zeros, MEAN, STD))
    return {"model": model, "res": res, "batch": batch, "device": device_name, "sdpa_backend": backend,
            **{f"{stage}_s": round(s, 3) for stage, s in seconds.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", nargs="+", default=["512:32", "1024:8"], help="RES:BATCH, each in a fresh process")
    p.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    p.add_argument("--busy-helpers", nargs="+", type=int, default=[0],
                   help="beside this many busy processes (0: alone), each a row [default: 0]")
    p.add_argument("--helper-niceness", nargs="+", type=int, default=[0],
                   help="the busy processes at this lower CPU priority, each a row [default: 0]")
    p.add_argument("--one", help=argparse.SUPPRESS)               # RES:BATCH:HELPERS:NICENESS in this process
    args = p.parse_args(argv)
    if args.one:
        res, batch, helpers, niceness = map(int, args.one.split(":"))
        print(json.dumps(first_uses(args.model, res, batch, args.device, helpers, niceness)))
        return
    from fpt.bench.common import write_results

    device = args.device or ("cuda" if _has_cuda() else "cpu")
    rows = []
    for spec, helpers, niceness in itertools.product(args.res, args.busy_helpers, args.helper_niceness):
        if helpers == 0 and niceness != args.helper_niceness[0]:
            continue                                    # alone: the helpers' priority is moot
        done = subprocess.run([sys.executable, "-m", "fpt.bench.first_step", "--one", f"{spec}:{helpers}:{niceness}",
                               "--model", args.model, "--device", device], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"first_step at {spec} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out = write_results(f"first_step-{device.split(':')[0]}", "fpt.bench.first_step", cases=rows)
    print(f"wrote {out}")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
