"""Figure 5 — scaling of our extraction with the LPM resolution: seconds and peak memory per image and store bytes
per image as res goes 256 -> 2048, with the terms behind them (FLOPs of the N-linear layers vs the N^2 attention
and importance, the O(N) memory terms, K/V vs the fixed low-res image in the store), and the growth exponent of
each measured figure in N (tokens) between neighbouring resolutions.

    python -m fpt.bench.scaling --model vit_tiny_patch16_224 --res 256 512 1024 2048
    python -m fpt.bench.scaling --model vit_base_patch16_224 --res 2048 --warmup 0 --reps 1

Batch 1; each res in a fresh process (``fpt.bench.extraction.extraction_case``, side ``ours``). Store bytes are
the compressed per-sample chunks the store would hold for that output (``store_size.sample_store_bytes``).
"""
from __future__ import annotations

import argparse
import json
import math

from fpt.bench.common import THREADS, command_line, merge_cases, run_case, write_results


def terms(case: dict) -> dict:
    """Analytical cost terms for one image (batch 1) of a ViT with the case's sizes."""
    N, D, H = case["tokens"], case["embed_dim"], case["heads"]
    depth, L, block = case["depth"], len(case["layers"]), case["query_block"]
    linear = depth * 2 * 12 * N * D * D                  # qkv (3D^2) + proj (D^2) + MLP (8D^2) MACs per token
    attention = depth * 2 * 2 * N * N * D                # q k^T and p v
    importance = L * 2 * N * N * D                       # q k^T again, blockwise, in the extracted layers
    return {
        "gflop_linear": round(linear / 1e9, 1), "gflop_attention": round(attention / 1e9, 1),
        "gflop_importance": round(importance / 1e9, 1),
        "n2_share_of_flops": round((attention + importance) / (linear + attention + importance), 3),
        "mb_mlp_hidden": round(N * 4 * D * 4 / 2**20, 1),                 # largest O(N) activation, fp32
        "mb_importance_block": round(H * min(block, N) * N * 4 / 2**20, 1),  # one [H, block, N] fp32 score tile
        "mb_official_probs": round(H * N * N * 4 / 2**20, 1),               # one [H, N, N] fp32, for contrast
    }


def growth(cases: list[dict], key: str) -> list[float | None]:
    """Exponent e in value ~ N^e between each case and the previous one (by res)."""
    out: list[float | None] = [None]
    for a, b in zip(cases, cases[1:]):
        va, vb = a.get(key), b.get(key)
        out.append(round(math.log(vb / va) / math.log(b["tokens"] / a["tokens"]), 2) if va and vb else None)
    return out


def analyse(cases: list[dict]) -> list[dict]:
    """One row per measured res: per-image figures, their growth exponents in N, and the cost terms."""
    cases = sorted((c for c in cases if "error" not in c), key=lambda c: c["res"])
    per_image = [{"tokens": c["tokens"], "seconds": c["median_s"] / c["units_per_step"],
                  "peak_mb": c["peak_mb"] / c["units_per_step"]} for c in cases]
    rows = []
    for c, p, t_exp, m_exp in zip(cases, per_image, growth(per_image, "seconds"), growth(per_image, "peak_mb")):
        store = c.get("store_bytes_per_image", {})
        kv = store.get("keys", 0) + store.get("values", 0)
        rows.append({"res": c["res"], "tokens": c["tokens"], "k": c["k"], "reps": len(c["step_seconds"]) - c["warmup"],
                     "seconds_per_image": round(p["seconds"], 3), "time_exponent": t_exp,
                     "peak_mb_per_image": round(p["peak_mb"], 1), "memory_exponent": m_exp,
                     "store_bytes_per_image": round(store.get("total", 0)),
                     "kv_share_of_store": round(kv / store["total"], 3) if store else None, **terms(c)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--res", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory run (one step; its time is reported too): for res too slow to repeat")
    p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads per process")
    args = p.parse_args(argv)

    cases = []
    for res in args.res:
        spec = {"side": "ours", "model": args.model, "res": res, "batch": 1, "store_bytes": True,
                "threads": args.threads}
        result = run_case("fpt.bench.extraction:extraction_case", spec, args.warmup, args.reps, timeout=3000,
                          timing_run=not args.memory_only)
        result["command"] = command_line("fpt.bench.scaling")
        print(json.dumps({k: result.get(k) for k in ("res", "median_s", "peak_mb", "error")}), flush=True)
        cases.append(result)
    name = f"scaling-{args.model}"
    cases = merge_cases(name, cases, ("res",))
    rows = analyse(cases)
    out = write_results(name, "fpt.bench.scaling", model=args.model, threads=args.threads, cases=cases,
                        analysis=rows)
    for row in rows:
        print(row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
