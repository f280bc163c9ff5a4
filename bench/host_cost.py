"""The host's CPU per image of extraction, and what a machine's cores can feed: process CPU time of what a decode
worker does for one image (``bench.decode.cpu_ms``: decoding a PNG at the LPM's size, the LPM's input as a
tensor, the collate), of handing a shard to a writer process (the main process's copy into a reused
hand-over file, ``fpt.store.shared.HandoverSlots``; ``handover_fresh_ms``: into a new file per shard, as before
the slots were reused) and of what a writer does (``StoreWriter.write_shard`` of the LPM's real output, in
shards of the size ``fpt extract`` chooses, per ``--codec``), and the images/s that ``--cores`` cores could
sustain with nothing else running: cores / (decode + write), as on a GPU machine, where the writers are
processes and the device copies each shard straight into its hand-over file (``handover_ms`` is the copy that
takes where the driver refuses to page-lock those files, and took before). The loop's CPU copy of each batch's
low-res images that ``main_copy_ms`` timed until 2026-11-27 is gone: that copy is made on the device now.

    python -m fpt.bench.host_cost --res 512 1024 --codecs zstd-1 none --cores 16

The model's output is computed once per res (random init, 2 demo images tiled to a shard); the write is timed on a
new store per codec and rep (in bench/.work, every file new, as in a run), median of ``--reps``, in a process
started as the writer processes are (their malloc setting included; ``--fresh-memory``: without it, the A/B of
that setting), so the CPU time includes zarr's codec threads and the kernel's part of the writes
(``write_kernel_ms``); the shard files are written past the page cache, as ``fpt extract`` writes them
(``--no-direct-io``: through it, as before 2026-11-28).
Results: bench/results/host_cost-<model>.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fpt.bench.common import command_line, write_results

def decode_ms(res: int, colour: bool, reps: int) -> float:
    """CPU ms of a decode worker's work for one PNG of [res, res] (RGB, or grey as most medical PNGs are)."""
    from fpt.bench.decode import cpu_ms
    from fpt.extract.datasets import synthetic_texture_image

    with tempfile.TemporaryDirectory() as tmp:
        pixels = synthetic_texture_image(res, 1, [0, res])
        path = Path(tmp) / "image.png"
        Image.fromarray(pixels if colour else pixels[..., 0]).save(path)
        return cpu_ms(path, res, reps)


def lpm_shard(model: str, res: int, image_res: int) -> dict[str, np.ndarray]:
    """A shard of the LPM's real output (2 demo images, tiled) in the store's dtypes, of as many samples as
    ``fpt extract`` puts in one (``choose_samples_per_shard``: 16 for ViT-B at 512, 4 at 1024)."""
    from fpt.bench.codec import lpm_output
    from fpt.store import choose_samples_per_shard

    two = lpm_output(model, res, 2, image_res=image_res)
    n = choose_samples_per_shard(sum(a[0].nbytes for a in two.values()))
    return {name: np.concatenate([a] * -(-n // 2))[:n] for name, a in two.items()}


def handover_ms(shard: dict[str, np.ndarray], reps: int) -> tuple[float, float]:
    """CPU ms per image of copying ``shard`` into a reused hand-over slot, and into a fresh file each time."""
    from fpt.store.shared import HandoverSlots, SharedArrays

    def per_image(put) -> float:
        times = []
        for _ in range(reps):
            start = time.process_time()
            put()
            times.append((time.process_time() - start) / len(shard["keys"]))
        return statistics.median(times) * 1000

    slots = HandoverSlots()

    def reused():
        with slots.put(shard):
            pass

    def fresh():
        with SharedArrays(shard):
            pass

    try:
        reused()                                # the slot's first fill faults its pages in, once per run
        return per_image(reused), per_image(fresh)
    finally:
        slots.close()


def write_ms(shard: dict[str, np.ndarray], codec: str, shards: int, reps: int,
             reuse_memory: bool = True, direct_io: bool = True) -> tuple[float, float, float, float]:
    """CPU ms per image of writing ``shards`` whole shards of ``shard`` through StoreWriter with ``codec`` (and
    of it, the kernel's), the bytes per image its sample arrays take on disk (chunks, shard indices, checksums)
    and the page faults per image of the writing process (minor: fresh memory touched, medians of ``reps``), in
    a process started as ``fpt extract``'s writer processes are (``reuse_memory``: with their malloc setting,
    ``fpt.store.shared.reuse_freed_memory``; without it, as before 2026-11-27). ``direct_io``: the shard files
    written past the page cache, as ``fpt extract`` writes them (without it: as before 2026-11-28)."""
    from concurrent.futures import ProcessPoolExecutor

    from fpt.forkserver import fork_server_context, starting
    from fpt.store.shared import reuse_freed_memory

    context = fork_server_context([__name__])
    with starting(), ProcessPoolExecutor(1, mp_context=context,
                                         initializer=reuse_freed_memory if reuse_memory else None) as process:
        return process.submit(_write_ms, shard, codec, shards, reps, direct_io).result()


def _write_ms(shard: dict[str, np.ndarray], codec: str, shards: int, reps: int,
              direct_io: bool) -> tuple[float, float, float, float]:
    import os
    import resource

    from fpt.bench.common import WORK_DIR
    from fpt.store import Geometry, StoreWriter

    per, layers, heads, k, head_dim = shard["keys"].shape
    geometry = Geometry(n_samples=per * shards, layers=layers, heads=heads, k=k, head_dim=head_dim,
                        embed_dim=shard["cls"].shape[1], image_res=shard["images"].shape[1],
                        samples_per_shard=per)
    attrs = {"backbone": {"name": "bench"}, "extraction": {}, "dataset": {"name": "bench", "classes": ["a", "b"]},
             "normalization": {}}
    n = geometry.n_samples
    ids = np.array([f"s{i}" for i in range(n)], dtype=object)
    times, kernel, faults = [], [], []
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    # on the disk stores go to (not a tmpfs), a new store per rep and none deleted until the end: as in a run,
    # every file is new (deleting one store before the next lets the kernel reuse its page-cache pages, cheaper)
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as tmp:
        for rep in range(reps):
            writer = StoreWriter.open(Path(tmp) / f"s{rep}.zarr", geometry, attrs, ids=ids, labels=np.zeros(n, int),
                                      split=np.zeros(n, int), codec=codec, direct_io=direct_io)
            start, system = time.process_time(), os.times().system
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for s in range(shards):
                writer.write_shard(s, shard)
            times.append((time.process_time() - start) / n)
            kernel.append((os.times().system - system) / n)
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted) / n)
        disk = sum(f.stat().st_size for name in shard for f in (Path(tmp) / "s0.zarr" / name).rglob("*")
                   if f.is_file() and f.name != "zarr.json")
    return statistics.median(times) * 1000, statistics.median(kernel) * 1000, disk / n, statistics.median(faults)


def official_bytes(shard: dict[str, np.ndarray]) -> int:
    """Bytes per image of the official layout: fp32 K and V (the reference of the store's size goal)."""
    return (shard["keys"][0].size + shard["values"][0].size) * 4


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--image-res", type=int, default=256)
    p.add_argument("--codecs", nargs="+", default=["zstd-1", "none"])
    p.add_argument("--cores", type=int, default=16, help="the host to size for (the H100 machine has 16)")
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fresh-memory", action="store_true",
                   help="time the writes without the writer processes' malloc setting (as before 2026-11-27)")
    p.add_argument("--no-direct-io", action="store_true",
                   help="time buffered writes (through the page cache, as before 2026-11-28)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for res in args.res:
        decode = {kind: decode_ms(res, kind == "rgb", 5) for kind in ("rgb", "grey")}
        shard = lpm_shard(args.model, res, args.image_res)
        handover, handover_fresh = handover_ms(shard, max(args.reps, 5))
        for codec in args.codecs:
            write, write_kernel, disk, faults = write_ms(shard, codec, args.shards, args.reps,
                                                         reuse_memory=not args.fresh_memory,
                                                         direct_io=not args.no_direct_io)
            rows.append({"res": res, "codec": codec, "kv_mb_per_image": round(shard["keys"][0].nbytes * 2 / 1e6, 2),
                         "decode_rgb_ms": round(decode["rgb"], 1), "decode_grey_ms": round(decode["grey"], 1),
                         "samples_per_shard": len(shard["keys"]), "handover_ms": round(handover, 2),
                         "handover_fresh_ms": round(handover_fresh, 2),
                         "writer_memory": "fresh" if args.fresh_memory else "reused",
                         "direct_io": not args.no_direct_io, "write_ms": round(write, 1),
                         "write_kernel_ms": round(write_kernel, 1),
                         "write_page_faults": round(faults), "disk_mb_per_image": round(disk / 1e6, 3),
                         "disk_vs_official": round(disk / official_bytes(shard), 3), "cores": args.cores,
                         "feedable_images_per_s_rgb": round(args.cores * 1000 / (decode["rgb"] + write)),
                         "feedable_images_per_s_grey": round(args.cores * 1000 / (decode["grey"] + write))})
            print(rows[-1], flush=True)
    name = (f"host_cost-{args.model}" + ("-fresh-memory" if args.fresh_memory else "")
            + ("-buffered" if args.no_direct_io else ""))
    out = write_results(name, "fpt.bench.host_cost", model=args.model, rows=rows,
                        command=command_line("fpt.bench.host_cost"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
