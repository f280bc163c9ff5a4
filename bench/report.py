"""Markdown tables of the result files in bench/results/ (what bench/README.md shows).

    python -m fpt.bench.report                    # every figure
    python -m fpt.bench.report extraction scaling # some figures
"""
from __future__ import annotations

import json
from pathlib import Path

from fpt.bench.common import RESULTS_DIR


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "met" if v else "**missed**"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _source(d: dict, path: Path) -> str:
    return (f"*{d['machine']}; {d['date']}; code {d.get('code', '?')}; torch {d['torch']}, {d['threads']} thread(s); "
            f"load average at start {', '.join(f'{x:.1f}' for x in d['load_avg_at_start'])}; "
            f"raw: `bench/results/{path.name}`*  \n`{d['command']}`")


def extraction(d: dict) -> str:
    by = {(c["res"], c["side"]): c for c in d["cases"]}
    rows = []
    for cmp in d["comparison"]:
        o, f = by[(cmp["res"], "ours")], by[(cmp["res"], "official")]
        goal = []
        if "speed_goal" in cmp:
            goal.append(f"speed ≥{cmp['speed_goal']}×: {_fmt(cmp['speed_goal_met'])}")
        if "memory_goal" in cmp:
            goal.append(f"memory ≤{cmp['memory_goal']}×: {_fmt(cmp['memory_goal_met'])}")
        default_malloc = o.get("peak_mb_default_malloc", 0) / max(f.get("peak_mb_default_malloc", 0), 1e-9)
        rows.append([d["model"].removeprefix("vit_").removesuffix("_patch16_224"), cmp["res"], cmp["batch"],
                     o["units_per_s"], f["units_per_s"], cmp["speedup"], cmp.get("speedup_cpu_time"),
                     o["peak_mb"], f["peak_mb"], cmp["memory_ratio"], round(default_malloc, 2),
                     "; ".join(goal) or "–"])
    return _table(["LPM", "res", "batch", "ours img/s", "official img/s", "speed-up (wall)", "speed-up (CPU time)",
                   "ours peak MB", "official peak MB", "memory ours/official", "same, default malloc", "goal"],
                  rows)


def store_size(d: dict) -> str:
    s = d["sizes"]
    out = _table(["LPM, res", "official B/img (fp32 safetensors)", "ours B/img (whole store)", "ours K/V B/img",
                  "store / official", "K/V / official", "goal ≤0.45×"],
                 [[f"{s['model']}, {s['res']}", round(s["official"]["bytes_per_image"]),
                   round(s["ours"]["bytes_per_image"]), round(s["ours"]["kv_bytes_per_image"]), s["ratio_store"],
                   s["ratio_kv"], s["goal_met"]]])
    if "lossy" in d:
        out += "\n\n" + _table(
            ["K/V encoding", "K/V B/img", "vs lossless", "vs official", "max abs error", "demo test AUC",
             "AUC change"],
            [[r["option"], round(r["kv_bytes_per_image"]), r.get("ratio_to_lossless"),
              round(r["kv_bytes_per_image"] / s["official"]["bytes_per_image"], 3), f"{r['max_abs_error']:.4f}",
              r.get("demo_test_auc"), r.get("auc_change")] for r in d["lossy"]])
    return out


def data_path(d: dict) -> str:
    by = {(c["source"], c["with_step"]): c for c in d["cases"]}

    def cell(source: str, with_step: bool, key: str) -> str:
        c, base = by.get((source, with_step), {}), by.get(("official", with_step), {})
        if c.get(key) is None:
            return "–"
        return f"{c[key]:,.1f}" + ("" if source == "official" else f" ({c[key] / base[key]:.2f}×)")

    def goal(source: str) -> str:
        if source == "official":
            return "–"
        c, base = by[(source, True)], by[("official", True)]
        met = [c[k] / base[k] >= 5 for k in ("units_per_s", "units_per_cpu_s")]
        return _fmt(all(met)) if len(set(met)) == 1 else "wall met, CPU missed" if met[0] else "CPU met, wall missed"

    rows = [[s, cell(s, True, "units_per_s"), cell(s, True, "units_per_cpu_s"), goal(s), cell(s, False, "units_per_s"),
             cell(s, False, "units_per_cpu_s"), by.get((s, True), {}).get("peak_mb")]
            for s in ("official", "ours-stream", "ours-ram")]
    return _table(["source", "epoch samples/s (wall)", "epoch samples per CPU-s", "goal ≥5×",
                   "loader-only samples/s (wall)", "loader-only per CPU-s", "epoch peak MB"], rows)


def train_memory(d: dict) -> str:
    return _table(["source", "peak MB above setup, one step", "RSS after setup MB", "step s (median)",
                   "learnable params"],
                  [[c["source"], c["peak_mb"], c["baseline_mb"], c["median_s"], c["learnable_params"]]
                   for c in d["cases"]]) + (f"\n\nours / official: {_fmt(d['memory_ratio_ours_to_official'])}; "
                                            f"GPU: {d['gpu']}")


def scaling(d: dict) -> str:
    return _table(["res", "tokens N", "k", "s/img", "time ∝ N^", "peak MB/img", "memory ∝ N^", "store B/img",
                   "K/V share of store", "N² share of FLOPs", "MLP hidden MB", "importance tile MB",
                   "official [H,N,N] MB"],
                  [[r["res"], r["tokens"], r["k"], r["seconds_per_image"], r["time_exponent"], r["peak_mb_per_image"],
                    r["memory_exponent"], r["store_bytes_per_image"], r["kv_share_of_store"], r["n2_share_of_flops"],
                    r["mb_mlp_hidden"], r["mb_importance_block"], r["mb_official_probs"]] for r in d["analysis"]])


RENDER = {"extraction": extraction, "store_size": store_size, "data_path": data_path, "train_memory": train_memory,
          "scaling": scaling}


def render(kinds: list[str] | None = None) -> str:
    """The tables of every result file (or of the figure kinds given), each with its provenance line."""
    parts = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        d = json.loads(path.read_text())
        kind = d["figure"].split("-")[0]
        if kinds and kind not in kinds:
            continue
        if kind in RENDER:
            parts.append(f"#### {d['figure']}\n\n{RENDER[kind](d)}\n\n{_source(d, path)}\n")
        else:     # figures 6, 7 and the GPU tables: written up by hand in bench/README.md from these files
            parts.append(f"#### {d['figure']}\n\n(no table renderer: see bench/README.md)\n\n{_source(d, path)}\n")
    return "\n".join(parts)


def main() -> None:
    import sys
    print(render(sys.argv[1:]))


if __name__ == "__main__":
    main()
