"""Items from DataLoader workers through reused shared-memory slots (``fpt.loader_slots``) against the DataLoader's
fresh shared memory per item, alternated, for both of its users:

- ``decode``: extraction's decode workers as ``fpt extract`` runs them (``DecodedImages``, batches of ``--batch``
  PNGs of the end-to-end bench, ``fpt.bench.gpu.png_tree``), each batch then copied into memory that is reused,
  as the DataLoader's pinning thread copies into page-locked memory on CUDA (there the real pinning thread does);
- ``stream``: training's store readers as ``fpt train --cache none`` runs them (``StreamSplit`` with
  ``--workers`` readers, default as ``fpt train`` chooses them, windows of ``--window-samples``, one epoch of
  shuffled batches of 16, on CUDA gathered on the device) on a store of the LPM's real output
  (``fpt.bench.store_read.make_store``: ViT-B at ``--res``, ``--shards`` shards of zstd-1).

CPU ms per image (or sample) of the workers (their system time apart: the kernel allocating and zeroing fresh
pages) and of the main process, the wall time and images (samples) per second.

    python -m fpt.bench.loader_slots decode --res 1024 --images 384 --reps 3
    python -m fpt.bench.loader_slots stream --res 512 --shards 16 --window-samples 16 --workers 2 --reps 3
    python -m fpt.bench.loader_slots stream --res 512 --shards 64 --window-samples 0 --reps 1   # a GPU host

A run's first items fill slots for the first time (two or three per worker), so the gain grows with the run.
Results: bench/results/loader_slots-<part>.json.
"""
from __future__ import annotations

import argparse
import gc
import resource
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader

from fpt.bench.common import write_results


class PngFiles:
    def load(self, path):
        from PIL import Image
        return Image.open(path)


def decode_epoch(args, slots_on: bool) -> int:
    """One pass of the decode workers over the PNGs; returns the images."""
    from fpt.bench.gpu import png_tree
    from fpt.extract.run import DecodedImages, decode_slot_bytes
    from fpt.loader_slots import loader_slots, received
    from fpt.store import start_helper

    paths = sorted(png_tree(args.res, args.images).rglob("*.png"))
    pinned = torch.cuda.is_available()
    with loader_slots(args.workers if slots_on else 0, decode_slot_bytes(args.batch, args.res), pinned) as slots:
        images = DecodedImages(PngFiles(), paths, args.res, "fail", slots=slots)
        into = None
        for high, _ in DataLoader(images, batch_size=args.batch, num_workers=args.workers,
                                  collate_fn=images.collate, pin_memory=pinned,
                                  worker_init_fn=start_helper):
            high = received(high)
            if not pinned:                          # the pinning thread's copy, into memory it reuses
                into = torch.empty_like(high) if into is None or into.shape != high.shape else into
                into.copy_(high)
    return len(paths)


@contextmanager
def _no_slots():
    yield None


def stream_epoch(args, slots_on: bool) -> int:
    """One shuffled epoch of the store readers; returns the samples."""
    from fpt.bench.store_read import make_store
    from fpt.store import StoreReader
    from fpt.train import data

    path = make_store("vit_base_patch16_224", args.res, "zstd-1", args.shards, 256)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = data.StreamSplit(StoreReader(path), "train", ("images", "keys", "values"), device,
                             workers=args.workers, window_samples=args.window_samples)    # None: as fpt train
    args.readers, samples = split.workers, len(split)
    real = data.loader_slots
    if not slots_on:                                # the DataLoader's own way, as before 2026-11-28
        data.loader_slots = lambda *a, **k: _no_slots()
    try:
        for epoch in range(args.epochs):
            for _ in split.batches(16, shuffle=True, rng=np.random.default_rng(epoch)):
                pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        data.loader_slots = real
    del split                                       # its readers stop: their CPU counts in RUSAGE_CHILDREN
    gc.collect()
    return samples * args.epochs


def measure(epoch, args, slots_on: bool) -> dict:
    children, main = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    n = epoch(args, slots_on)                       # its workers joined at the end: their CPU is in CHILDREN
    wall = time.perf_counter() - start
    children_after, main_after = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)

    def ms(a, b, fields=("ru_utime", "ru_stime")):
        return round(1e3 * sum(getattr(b, f) - getattr(a, f) for f in fields) / n, 2)

    return {"slots": slots_on, "items": n, "items_per_s": round(n / wall, 1),
            "workers_cpu_ms": ms(children, children_after),
            "workers_system_ms": ms(children, children_after, ("ru_stime",)),
            "main_cpu_ms": ms(main, main_after), "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["decode", "stream"])
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--images", type=int, default=384, help="decode: PNGs")
    p.add_argument("--batch", type=int, default=8, help="decode: images per batch")
    p.add_argument("--shards", type=int, default=16, help="stream: shards in the store")
    p.add_argument("--epochs", type=int, default=1, help="stream: epochs of one split (its readers persist)")
    p.add_argument("--window-samples", type=int, default=16, help="stream: samples per read window (0: as fpt "
                   "train, a window of 256 MB)")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default 2) or store readers "
                   "(default: as fpt train, none on a CPU)")
    p.add_argument("--reps", type=int, default=2, help="runs per side, alternated")
    args = p.parse_args(argv)
    if args.part == "decode" and args.workers is None:
        args.workers = 2
    args.window_samples = args.window_samples or None
    torch.set_num_threads(1)
    epoch = decode_epoch if args.part == "decode" else stream_epoch
    epoch(args, True)                               # inputs made (PNGs, store) and imports done, untimed
    rows = []
    for _ in range(args.reps):
        for slots_on in (False, True):
            rows.append({**vars(args), **measure(epoch, args, slots_on)})
            print(rows[-1], flush=True)
    print(write_results(f"loader_slots-{args.part}", "fpt.bench.loader_slots", rows=rows))


if __name__ == "__main__":
    main()
