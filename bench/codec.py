"""The store's chunk codec, chosen by measurement: bytes per image against single-thread encode/decode MB/s for
Blosc compressors, levels, shuffles and block sizes, on real LPM output (``FrozenLPM`` K/V, indices, class token
of the demo's images at the given backbone and res; random-init weights here, since none can be downloaded).

    python -m fpt.bench.codec --model vit_base_patch16_224 --res 512 --images 4

Every candidate is lossless (each chunk is decoded and compared). Per-sample chunks, as the store writes them.
The official layout's bytes (fp32 K and V per image, safetensors) are the reference for the size goal (<= 0.45x).
Results: bench/results/codec-<model>-<res>.json.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from fpt.bench.common import command_line, write_results

# (cname, level, shuffle, Blosc block size in bytes: 0 = Blosc's automatic choice, tens of KB at low levels).
# Blosc compresses each block on its own, so the block size bounds what zstd can match across; byte shuffle
# gains most from large blocks.
BLOCK_SIZES = (0, 256 << 10, 512 << 10, 1 << 20)
CANDIDATES = ([(cname, level, shuffle, block) for cname, levels in (("zstd", (1, 3, 5)), ("lz4", (5,)))
               for level in levels for shuffle in ("shuffle", "bitshuffle") for block in BLOCK_SIZES]
              + [(cname, 5, "noshuffle", 0) for cname in ("zstd", "lz4")])
STORE_ARRAYS = ("keys", "values", "indices", "cls", "images")


def store_arrays(path: str) -> dict[str, np.ndarray]:
    """The per-sample arrays of an existing store (e.g. one a benchmark extracted), as extraction wrote them."""
    import zarr
    group = zarr.open_group(path, mode="r")
    return {name: group[name][:] for name in STORE_ARRAYS}


def lpm_output(model: str, res: int, n: int, precision: str = "fp32", image_res: int = 256
               ) -> dict[str, np.ndarray]:
    """The arrays extraction stores for ``n`` demo images, in the store's dtypes (per sample on axis 0), with the
    LPM run under ``precision`` autocast as ``fpt extract --precision`` runs it (bf16 K/V have three mantissa
    bits fewer than the stored fp16, which compresses them further) and low-res copies of ``image_res``."""
    import torch

    from fpt.bench.data import synthetic_inputs
    from fpt.extract.backbone import FrozenLPM, create_backbone
    from fpt.extract.encode import AUTOCAST
    from fpt.extract.run import default_layers

    warnings.filterwarnings("ignore")
    net, info = create_backbone(model, res, random_init=True)
    lpm = FrozenLPM(net, default_layers(info.depth), 0.2, "global")
    x, low = synthetic_inputs(n, res, image_res)
    dtype = AUTOCAST[precision]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = lpm(x)
    return {"keys": out["keys"].half().numpy(), "values": out["values"].half().numpy(),
            "indices": out["indices"].int().numpy(), "cls": out["cls"].half().numpy(), "images": low}


def blosc_codec(cname: str, level: int, shuffle: str, blocksize: int = 0):
    """numcodecs' Blosc with the settings zarr's BloscCodec gets from ``fpt.store.CODECS`` (same typesize from
    the chunk dtype), to measure chunks outside a store."""
    from numcodecs import Blosc
    shuffles = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE, "noshuffle": Blosc.NOSHUFFLE}
    return Blosc(cname=cname, clevel=level, shuffle=shuffles[shuffle], blocksize=blocksize)


def codec_label(cname: str, level: int, shuffle: str, blocksize: int) -> str:
    return f"{cname}-{level}-{shuffle}-" + (f"{blocksize >> 10}k" if blocksize else "auto")


def measure_codec(arrays: dict[str, np.ndarray], cname: str, level: int, shuffle: str, blocksize: int = 0,
                  reps: int = 3) -> dict:
    from numcodecs import blosc

    blosc.set_nthreads(1)
    codec = blosc_codec(cname, level, shuffle, blocksize)
    label = codec_label(cname, level, shuffle, blocksize)
    chunks = {name: [np.ascontiguousarray(s) for s in a] for name, a in arrays.items()}
    n = len(next(iter(arrays.values())))
    sizes, raw, enc_s, dec_s = {}, 0, [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        encoded = {name: [codec.encode(c) for c in cs] for name, cs in chunks.items()}
        t1 = time.perf_counter()
        decoded = {name: [codec.decode(e) for e in es] for name, es in encoded.items()}
        t2 = time.perf_counter()
        enc_s.append(t1 - t0)
        dec_s.append(t2 - t1)
    for name, cs in chunks.items():
        for c, d in zip(cs, decoded[name]):
            if np.frombuffer(d, dtype=c.dtype).tobytes() != c.tobytes():
                raise AssertionError(f"{label} is not lossless on {name}")
        sizes[name] = sum(len(e) for e in encoded[name]) / n
    raw = sum(a.nbytes for a in arrays.values())
    kv_raw = arrays["keys"].nbytes + arrays["values"].nbytes
    return {"codec": label, "cname": cname, "level": level, "shuffle": shuffle, "blocksize": blocksize,
            "bytes_per_image": sum(sizes.values()), "kv_bytes_per_image": sizes["keys"] + sizes["values"],
            "per_array_bytes_per_image": sizes,
            "kv_ratio_to_fp16": (sizes["keys"] + sizes["values"]) * n / kv_raw,
            "encode_mb_s": raw / min(enc_s) / 1e6, "decode_mb_s": raw / min(dec_s) / 1e6}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--store", help="measure on this store's arrays instead of running the LPM")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per codec (the fastest counts)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the LPM's autocast precision on this CPU (as fpt extract --precision)")
    args = p.parse_args(argv)
    arrays = store_arrays(args.store) if args.store else lpm_output(args.model, args.res, args.images, args.precision)
    official = (arrays["keys"][0].size + arrays["values"][0].size) * 4          # fp32 K and V per image
    rows = []
    for cname, level, shuffle, blocksize in CANDIDATES:
        row = measure_codec(arrays, cname, level, shuffle, blocksize, args.reps)
        row["ratio_to_official"] = row["bytes_per_image"] / official
        rows.append(row)
        print(f"{row['codec']:28s} {row['bytes_per_image'] / 1e6:7.3f} MB/image  x{row['ratio_to_official']:.3f} "
              f"of official  enc {row['encode_mb_s']:7.1f} MB/s  dec {row['decode_mb_s']:7.1f} MB/s", flush=True)
    name = (f"codec-{args.model}-{args.res}" + ("-store" if args.store else "")
            + (f"-{args.precision}" if args.precision != "fp32" and not args.store else ""))
    out = write_results(name, "fpt.bench.codec", model=args.model, res=args.res, store=args.store,
                        images=len(arrays["keys"]), reps=args.reps, precision=None if args.store else args.precision,
                        official_bytes_per_image=official, rows=rows,
                        command=command_line("fpt.bench.codec"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
