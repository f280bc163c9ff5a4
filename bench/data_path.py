"""Figure 3 — training data path: samples/s of a training epoch of the same side network (ViT-B K/V from 512,
side 128, 16 prompts, batch 16, CPU) fed

* ``official``: per sample, decode the full-resolution PNG, augment it with torchvision on the PIL image, load
  its fp32 safetensors file (``OfficialTrainData``);
* ``ours-stream``: our store streamed (``open_split(..., "none", ...)``: whole shards a window at a time, a
  prefetch thread on CPU), batched augmentation of the stored low-res copy (``SideInput``);
* ``ours-ram``: the same from the in-memory split (``open_split(..., "ram", ...)``).

Each source is measured twice, each in its own processes: with ``fpt train``'s training step
(``fpt.train.step.TrainStep``: augmentation, forward, backward, clip, AdamW, schedule), the figure the goal refers
to, and loader-only (batches produced and augmented, no model), which isolates the data path. No DataLoader
workers on either side (2 cores); files are in the page cache.

    python -m fpt.bench.data_path                  # 32 training images, 1 warm-up epoch + 3 timed epochs
    python -m fpt.bench.data_path --png-res 2048   # the official side decodes 2048 px originals
    python -m fpt.bench.data_path --profile        # + cProfile of one epoch per source -> results/*.txt
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from fpt.bench.common import RESULTS_DIR, THREADS, Case, command_line, ratio, run_case, write_results

SOURCES = ("official", "ours-stream", "ours-ram")
GOAL = 5.0             # ours / official samples/s


def side_setup(store, side_res: int = 128, prompts: int = 16, batch_size: int = 16, epochs: int = 1):
    """What ``fpt train`` builds for ``store`` (FPT+, CPU): reader, config, model in train mode, and its AdamW +
    cosine schedule (``make_optimizer``, the same as ``fpt train``'s)."""
    import torch
    from fpt.config import train_config
    from fpt.store import StoreReader
    from fpt.train.loop import model_spec
    from fpt.train.model import build_model
    from fpt.train.step import make_optimizer

    reader = StoreReader(store)
    cfg = train_config(store, None, side_res=side_res, prompts=prompts, batch_size=batch_size, device="cpu",
                       epochs=epochs)
    torch.manual_seed(0)
    model = build_model(model_spec(reader, cfg))
    model.train()
    steps = epochs * -(-len(reader.split_indices("train")) // batch_size)
    optimizer, schedule = make_optimizer(model, cfg.lr, cfg.weight_decay, steps, torch.device("cpu"))
    return reader, cfg, model, optimizer, schedule


class AlreadyAugmented:
    """The side input of batches whose images come out of the loader augmented and normalised (the official
    loader): ``fpt train``'s step with nothing left to do on the images."""

    def __call__(self, images, train: bool, draws=None):
        return images

    def to(self, device) -> "AlreadyAugmented":
        """Nothing to move (``TrainStep`` moves its side input's constants to the model's device)."""
        return self

    def draw(self, steps: int, n: int):
        import torch
        return torch.zeros(steps, 0, n)


def batch_source(source: str, data, reader, cfg, rng, png_res: int | None = None):
    """(epoch: () -> iterator of batch dicts, side_input) for ``source``: the official per-sample loader, whose
    images come out augmented and normalised, or fpt's split (streamed or in RAM) with ``SideInput``."""
    if source == "official":
        from fpt.bench.official import OfficialTrainData
        norm = reader.attrs["normalization"]
        official = OfficialTrainData(*data.train_images(png_res), data.official, cfg.side_res, norm["mean"],
                                     norm["std"])
        return (lambda: official.batches(cfg.batch_size, rng)), AlreadyAugmented()
    import torch
    from fpt.train.data import SideInput, open_split
    from fpt.train.loop import model_spec
    split = open_split(reader, "train", model_spec(reader, cfg).inputs, "none" if source == "ours-stream" else "ram",
                       torch.device("cpu"), cfg.workers)
    norm = reader.attrs["normalization"]
    side_input = SideInput(cfg.side_res, norm["mean"], norm["std"], seed=cfg.seed)
    return (lambda: split.batches(cfg.batch_size, shuffle=True, rng=rng)), side_input


def data_path_case(source: str, model: str, res: int, n_train: int, with_step: bool,
                   png_res: int | None = None) -> Case:
    """One training epoch (``with_step``) or one loader-only pass (batches made and augmented, no model) over
    the train split from ``source``; ``png_res``: the official loader decodes originals of that side."""
    from fpt.bench.data import ensure_dataset
    from fpt.train.step import TrainStep

    data = ensure_dataset(model, res, n_train)
    reader, cfg, net, optimizer, schedule = side_setup(data.store)
    epoch_batches, side_input = batch_source(source, data, reader, cfg, np.random.default_rng(0), png_res)
    step = TrainStep(net, side_input, optimizer, schedule)
    units = len(reader.split_indices("train"))

    def epoch() -> None:
        if with_step:
            draws = side_input.draw(-(-units // cfg.batch_size), cfg.batch_size)
            for i, batch in enumerate(epoch_batches()):
                step(batch, draws[i, :, :len(batch["labels"])])
        else:
            for batch in epoch_batches():
                side_input(batch["images"], train=True)

    return Case(step=epoch, units=units,
                info={"batch": cfg.batch_size, "side_res": cfg.side_res, "prompts": cfg.prompts})


def profile(source: str, model: str, res: int, n_train: int, png_res: int | None = None, threads: int = THREADS,
            top: int = 25) -> str:
    """cProfile of one epoch with the training step (after a warm-up epoch), top entries by cumulative time."""
    import cProfile
    import io
    import pstats
    import torch
    torch.set_num_threads(threads)
    case = data_path_case(source, model, res, n_train, with_step=True, png_res=png_res)
    case.step()
    prof = cProfile.Profile()
    prof.runcall(case.step)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--png-res", type=int, default=None,
                   help="side of the original PNGs the official loader decodes (default: the LPM res)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads per process")
    args = p.parse_args(argv)

    from fpt.bench.data import ensure_dataset
    data = ensure_dataset(args.model, args.res, args.n_train)    # build once, outside the timed processes
    data.train_images(args.png_res)
    cases = []
    for with_step in (True, False):
        for source in SOURCES:
            spec = {"source": source, "model": args.model, "res": args.res, "n_train": args.n_train,
                    "with_step": with_step, "png_res": args.png_res, "threads": args.threads}
            result = run_case("fpt.bench.data_path:data_path_case", spec, args.warmup, args.reps)
            result["command"] = command_line("fpt.bench.data_path")
            print(json.dumps({k: result.get(k) for k in ("source", "with_step", "units_per_s", "peak_mb", "error")}),
                  flush=True)
            cases.append(result)
    speed = {(c["source"], c["with_step"]): c.get("units_per_s") for c in cases}
    comparison = [{"source": s, "with_step": w, "ratio_to_official": ratio(speed[(s, w)], speed[("official", w)]),
                   **({"goal": GOAL, "goal_met": (ratio(speed[(s, w)], speed[("official", w)]) or 0) >= GOAL}
                      if w else {})}
                  for w in (True, False) for s in SOURCES[1:]]
    name = f"data_path-{args.model}-{args.res}" + (f"-png{args.png_res}" if args.png_res else "")
    content = {"threads": args.threads, "cases": cases, "comparison": comparison}
    if args.profile:
        for source in SOURCES:
            text = profile(source, args.model, args.res, args.n_train, args.png_res, args.threads)
            path = RESULTS_DIR / f"{name}-profile-{source}.txt"
            path.write_text(f"{command_line('fpt.bench.data_path')}\n\n{text}")
        content["profiles"] = [f"{name}-profile-{s}.txt" for s in SOURCES]
    out = write_results(name, "fpt.bench.data_path", **content)
    for row in comparison:
        print(row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
