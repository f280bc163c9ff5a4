"""How much CPU reading a store for training takes: process CPU ms and page faults per sample of
``StoreReader.read`` for a streamed window (whole shards in store order, as ``fpt train --cache none`` reads
them: ``train.data.StreamSplit``) and for a shuffled batch (rows in any order, a few per shard), K/V and low-res
images, on a store of the LPM's real output (random init, 2 demo images tiled to whole shards; written once per
model, res and codec into bench/.work).

    python -m fpt.bench.store_read --res 512 --shards 8 --reps 7

One process, set up as training's reader workers are (``start_helper``: their malloc setting;
``--fresh-memory``: without it, as before 2026-11-27), median of ``--reps`` after one untimed read. Results:
bench/results/store_read-<model>[-fresh-memory].json.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from fpt.bench.common import WORK_DIR, command_line, write_results

NAMES = ("keys", "values", "images")


def make_store(model: str, res: int, codec: str, shards: int, image_res: int) -> Path:
    """A store of ``shards`` whole shards of the LPM's real output, made once."""
    from fpt.bench.host_cost import lpm_shard
    from fpt.store import Geometry, StoreWriter

    path = WORK_DIR / f"store_read-{model}-{res}-{codec}-{shards}.zarr"
    if (path / "zarr.json").exists():
        return path
    shard = lpm_shard(model, res, image_res)
    per, layers, heads, k, head_dim = shard["keys"].shape
    geometry = Geometry(n_samples=per * shards, layers=layers, heads=heads, k=k, head_dim=head_dim,
                        embed_dim=shard["cls"].shape[1], image_res=shard["images"].shape[1], samples_per_shard=per)
    # a store's attributes as fpt writes them (StoreReader checks them), of this shard's shapes
    attrs = {"backbone": {"name": model, "embed_dim": geometry.embed_dim, "heads": heads, "head_dim": head_dim,
                          "patch_size": 16, "depth": 12, "prefix_tokens": 1, "n_params": 0, "weights_sha256": "0" * 64,
                          "weights_source": "random-init", "random_init": True},
             "extraction": {"res": res, "layers": list(range(12 - layers, 12)), "token_ratio": 0.2, "k": k,
                            "importance": "global", "dtype": "float16", "image_res": image_res},
             "dataset": {"name": "bench", "classes": ["a", "b"], "source": "bench", "counts": {}},
             "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    n = geometry.n_samples
    writer = StoreWriter.open(path, geometry, attrs, ids=np.array([f"s{i}" for i in range(n)], dtype=object),
                              labels=np.arange(n) % 2, split=np.zeros(n, int), overwrite=True, codec=codec)
    for s in range(shards):
        writer.write_shard(s, shard)
    return path


def read_cost(path: Path, idx: np.ndarray, reps: int) -> tuple[float, float]:
    """Median CPU ms and page faults per sample of reading ``idx`` (after one untimed read)."""
    from fpt.store import StoreReader

    reader = StoreReader(path)
    reader.read(idx, NAMES)
    times, faults = [], []
    for _ in range(reps):
        start, faulted = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        reader.read(idx, NAMES)
        times.append((time.process_time() - start) / len(idx))
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted) / len(idx))
    return statistics.median(times) * 1000, statistics.median(faults)


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", type=int, nargs="+", default=[512])
    p.add_argument("--image-res", type=int, default=256)
    p.add_argument("--codec", default="zstd-1")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--fresh-memory", action="store_true", help="without the reader workers' malloc setting")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.fresh_memory:
        from fpt.store import reuse_freed_memory
        reuse_freed_memory()
    from fpt.store import StoreReader
    from fpt.train.data import WINDOW_BYTES, sample_bytes

    rows = []
    for res in args.res:
        path = make_store(args.model, res, args.codec, args.shards, args.image_res)
        reader = StoreReader(path)
        n = len(reader.ids)
        per = reader.geometry.samples_per_shard               # StreamSplit's window: whole shards, ~WINDOW_BYTES
        window = min(n, -(-max(1, WINDOW_BYTES // sample_bytes(reader, NAMES)) // per) * per)
        batch = np.random.default_rng(0).permutation(n)[:args.batch]
        for kind, idx in (("window", np.arange(window)), ("shuffled batch", batch)):
            ms, faults = read_cost(path, idx, args.reps)
            rows.append({"res": res, "codec": args.codec, "read": kind, "samples": len(idx),
                         "samples_per_shard": per, "cpu_ms_per_sample": round(ms, 2),
                         "page_faults_per_sample": round(faults),
                         "reader_memory": "fresh" if args.fresh_memory else "reused"})
            print(rows[-1], flush=True)
    out = write_results(f"store_read-{args.model}" + ("-fresh-memory" if args.fresh_memory else ""),
                        "fpt.bench.store_read", model=args.model, rows=rows,
                        command=command_line("fpt.bench.store_read"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
