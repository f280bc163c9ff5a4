"""The decode workers' way to the main process, as ``fpt extract`` runs it: ``DecodedImages`` through a DataLoader
(``--workers``, batches of ``--batch``), each batch then copied into memory that is reused, as the DataLoader's
pinning thread copies into page-locked memory on CUDA (there the real pinning thread does it). With the batches
in shared-memory slots reused from batch to batch (``fpt.extract.decoded_batches``) and without (the
DataLoader's fresh shared memory per batch), alternated: CPU ms per image of the workers (their system time
apart: the kernel allocating and zeroing fresh pages) and of the main process, and the wall time.

    python -m fpt.bench.decode_loader --res 1024 --images 384 --reps 2

The PNGs are the end-to-end bench's (``fpt.bench.gpu.png_tree``). A run's first batches fill slots for the
first time (two or three per worker), so the gain grows with the run. Results: bench/results/decode_loader.json.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.utils.data import DataLoader

from fpt.bench.common import write_results
from fpt.bench.gpu import png_tree


class PngFiles:
    def load(self, path):
        from PIL import Image
        return Image.open(path)


def run(paths: list, res: int, batch: int, workers: int, slots_on: bool) -> dict:
    from fpt.extract.decoded_batches import decode_slots, received
    from fpt.extract.run import DecodedImages
    from fpt.store import start_worker_reusing_memory

    pinned = torch.cuda.is_available()
    with decode_slots(workers if slots_on else 0, batch, res, pinned) as slots:
        images = DecodedImages(PngFiles(), paths, res, "fail", slots=slots)
        loader = DataLoader(images, batch_size=batch, num_workers=workers, collate_fn=images.collate,
                            pin_memory=pinned, worker_init_fn=start_worker_reusing_memory)
        children, main = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        start, into = time.perf_counter(), None
        for high, _ in loader:
            high = received(high)
            if not pinned:                          # the pinning thread's copy, into memory it reuses
                into = torch.empty_like(high) if into is None or into.shape != high.shape else into
                into.copy_(high)
        wall = time.perf_counter() - start
        del loader                                  # its workers joined: their CPU is in RUSAGE_CHILDREN now
    children_after, main_after = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)

    def ms(a, b, fields=("ru_utime", "ru_stime")):
        return round(1e3 * sum(getattr(b, f) - getattr(a, f) for f in fields) / len(paths), 2)

    return {"slots": slots_on, "res": res, "images": len(paths), "batch": batch, "workers": workers,
            "pinned": pinned, "workers_cpu_ms": ms(children, children_after),
            "workers_system_ms": ms(children, children_after, ("ru_stime",)),
            "main_cpu_ms": ms(main, main_after), "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=2, help="runs per side, alternated")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    paths = sorted(png_tree(args.res, args.images).rglob("*.png"))
    rows = []
    for _ in range(args.reps):
        for slots_on in (False, True):
            rows.append(run(paths, args.res, args.batch, args.workers, slots_on))
            print(rows[-1], flush=True)
    print(write_results("decode_loader", "fpt.bench.decode_loader", rows=rows))


if __name__ == "__main__":
    main()
