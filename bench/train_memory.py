"""Figure 4 — training memory: peak memory of one training step at the paper's setting (ViT-B K/V from 512,
side 128, batch 16, 16 prompts) on CPU, fed the official way (fp32 K/V from per-image safetensors, augmented
full-resolution PNGs) and our way (fp16 K/V from the in-memory store cache, augmented low-res copies, cast to
fp32 for the model as ``fpt train`` does).

    python -m fpt.bench.train_memory

One step = produce one batch from the source + ``fpt train``'s step (``TrainStep``: augmentation, forward,
backward, clip, AdamW, schedule); measured over 1 warm-up + 3 steps in
a fresh process, above the RSS after the model, optimiser and data source are set up. No GPU here: the GPU
figure (the paper's 736 MB is GPU memory) is not measured.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from fpt.bench.common import THREADS, Case, command_line, ratio, run_case, write_results
from fpt.bench.data_path import batch_source, side_setup

SOURCES = ("official", "ours-ram")


def train_step_case(source: str, model: str, res: int, n_train: int, batch: int, prompts: int) -> Case:
    """One step = the next batch from ``source`` (a new epoch when one ends) + one training step."""
    from fpt.bench.data import ensure_dataset
    from fpt.train.model import lpm_parameters, parameter_counts

    from fpt.train.step import TrainStep

    data = ensure_dataset(model, res, n_train)
    reader, cfg, net, optimizer, schedule = side_setup(data.store, prompts=prompts, batch_size=batch)
    epoch_batches, side_input = batch_source(source, data, reader, cfg, np.random.default_rng(0))
    train_step = TrainStep(net, side_input, optimizer, schedule)
    stream = iter(())

    def step() -> None:
        nonlocal stream
        item = next(stream, None)
        if item is None:
            stream = epoch_batches()
            item = next(stream)
        train_step(item, side_input.draw(1, len(item["labels"]))[0])

    counts = parameter_counts(net, lpm_parameters(reader.attrs["backbone"]))
    return Case(step=step, units=batch, info={"learnable_params": counts["learnable"],
                                              "learnable_percent": round(counts["ratio_percent"], 3),
                                              "kv_shape": [batch, *reader.geometry.sample_shapes()["keys"][0]]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads per process")
    args = p.parse_args(argv)

    from fpt.bench.data import ensure_dataset
    ensure_dataset(args.model, args.res, args.n_train)
    cases = []
    for source in SOURCES:
        spec = {"source": source, "model": args.model, "res": args.res, "n_train": args.n_train,
                "batch": args.batch, "prompts": args.prompts, "threads": args.threads}
        result = run_case("fpt.bench.train_memory:train_step_case", spec, warmup=1, reps=args.reps)
        result["command"] = command_line("fpt.bench.train_memory")
        print(json.dumps({k: result.get(k) for k in ("source", "peak_mb", "baseline_mb", "median_s", "error")}),
              flush=True)
        cases.append(result)
    peak = {c["source"]: c.get("peak_mb") for c in cases}
    out = write_results(f"train_memory-{args.model}-{args.res}", "fpt.bench.train_memory", threads=args.threads,
                        cases=cases, device="cpu", gpu="not measured: no GPU on this machine",
                        memory_ratio_ours_to_official=ratio(peak["ours-ram"], peak["official"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
