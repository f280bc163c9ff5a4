"""Figure 1 — extraction: images/s and peak memory of fpt's LPM pass (timm's fused attention + blockwise
importance, ``FrozenLPM``) against the official approach (eager attention with full N x N probabilities in every
block, top-k per head, ``OfficialExtractor``). Same backbone, weights, images and batch; each case in its own
process.

    python -m fpt.bench.extraction --model vit_tiny_patch16_224 --res 256 512 1024
    python -m fpt.bench.extraction --model vit_base_patch16_224 --res 256 512 1024 --reps 2

Measured: one step = one LPM forward with selection of the last-half layers' top-k K/V (token ratio 0.2) on a
batch already decoded and normalised in memory (decoding and writing are the same work on both sides, and the
store is figure 2). Results merge into bench/results/extraction-<model>.json (one entry per res and side).
"""
from __future__ import annotations

import argparse
import json
import warnings

from fpt.bench.common import (RESULTS_DIR, THREADS, Case, command_line, merge_cases, ratio, run_case,
                               write_results)
from fpt.extract.selection import num_selected

SIDES = ("ours", "official")
GOALS = {512: {"speed": 1.5}, 1024: {"speed": 3.0, "memory": 0.25}}    # ours/official, measured in one run


def extraction_case(side: str, model: str, res: int, batch: int, token_ratio: float = 0.2,
                    query_block: int = 256, store_bytes: bool = False) -> Case:
    """One LPM pass with top-k selection over ``batch`` synthetic images at ``res``, the ``side`` way.
    ``store_bytes``: afterwards, the compressed bytes per image our store would hold for this output."""
    from fpt.bench.data import synthetic_inputs
    from fpt.bench.official import OfficialExtractor
    from fpt.extract.backbone import FrozenLPM, create_backbone
    from fpt.extract.run import default_layers

    warnings.filterwarnings("ignore")
    net, info = create_backbone(model, res, random_init=True)
    layers = default_layers(info.depth)
    x, low = synthetic_inputs(batch, res)
    if side == "ours":
        lpm = FrozenLPM(net, layers, token_ratio, "global", query_block)
    elif side == "official":
        lpm = OfficialExtractor(net, layers, token_ratio, "global")
    else:
        raise ValueError(f"unknown side {side!r}")
    last: dict = {}
    tokens = (res // info.patch_size) ** 2 + info.prefix_tokens

    def after() -> dict:
        from fpt.bench.store_size import sample_store_bytes
        return {"store_bytes_per_image": sample_store_bytes(last["out"], low)} if store_bytes else {}

    return Case(step=lambda: last.update(out=lpm(x)), units=batch, after=after, info={
        "weights_sha256": info.weights_sha256[:16], "tokens": tokens, "heads": info.heads, "layers": layers,
        "embed_dim": info.embed_dim, "head_dim": info.head_dim, "depth": info.depth, "query_block": query_block,
        "k": num_selected(tokens, token_ratio),
        "attention_probs_mb": round(batch * info.heads * tokens ** 2 * 4 / 2**20, 1),   # one block's [B,H,N,N]
    })


def profile(side: str, model: str, res: int, batch: int, threads: int = THREADS, top: int = 15) -> str:
    """torch.profiler table (top ops by self CPU time) of one step after a warm-up step."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    torch.set_num_threads(threads)
    case = extraction_case(side, model, res, batch)
    case.step()
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def compare(cases: list[dict]) -> list[dict]:
    """Per (res, batch): ours/official speed and memory ratios, and the goals they are held to."""
    rows = []
    by_key = {(c["res"], c["batch"], c["side"]): c for c in cases}
    for (res, batch, side), ours in sorted(by_key.items()):
        official = by_key.get((res, batch, "official"))
        if side != "ours" or official is None:
            continue
        row = {"res": res, "batch": batch,
               "speedup": ratio(ours.get("units_per_s"), official.get("units_per_s")),
               "speedup_cpu_time": ratio(ours.get("units_per_cpu_s"), official.get("units_per_cpu_s")),
               "memory_ratio": ratio(ours.get("peak_mb"), official.get("peak_mb")),
               "same_weights": ours.get("weights_sha256") == official.get("weights_sha256")}
        goal = GOALS.get(res, {})
        if "speed" in goal:
            row["speed_goal"] = goal["speed"]
            row["speed_goal_met"] = row["speedup"] is not None and row["speedup"] >= goal["speed"]
        if "memory" in goal:
            row["memory_goal"] = goal["memory"]
            row["memory_goal_met"] = row["memory_ratio"] is not None and row["memory_ratio"] <= goal["memory"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--res", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--profile", action="store_true", help="torch.profiler table per side and res -> results/*.txt")
    p.add_argument("--profile-only", action="store_true", help="only the profiles, no measurement")
    p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads per process")
    args = p.parse_args(argv)
    name = f"extraction-{args.model}"
    if not args.profile_only:
        measure(args, name)
    if args.profile or args.profile_only:
        for res in args.res:
            for side in args.sides:
                path = RESULTS_DIR / f"{name}-{res}-profile-{side}.txt"
                table = profile(side, args.model, res, args.batch, args.threads)
                path.write_text(f"{command_line('fpt.bench.extraction')}\n\n{table}")
                print(f"wrote {path}")


def measure(args, name: str) -> None:
    """Both sides at every res, each case in its own processes; merged into bench/results/<name>.json."""
    cases = []
    for res in args.res:
        for side in args.sides:
            spec = {"side": side, "model": args.model, "res": res, "batch": args.batch, "threads": args.threads}
            result = run_case("fpt.bench.extraction:extraction_case", spec, args.warmup, args.reps)
            result["command"] = command_line("fpt.bench.extraction")
            print(json.dumps({k: result.get(k) for k in ("side", "res", "units_per_s", "peak_mb", "error")}),
                  flush=True)
            cases.append(result)
    cases = merge_cases(name, cases, ("side", "res", "batch"))
    out = write_results(name, "fpt.bench.extraction", model=args.model, threads=args.threads,
                        cases=cases, comparison=compare(cases))
    for row in compare(cases):
        print(row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
