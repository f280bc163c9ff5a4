"""Figure 2 — store size: bytes per image of the official layout (one fp32 safetensors file per image with K and
V) against our Zarr store (fp16, Blosc-zstd, sharded) at the same backbone, k, layers and resolution; plus two
lossy options, measured here only (the store format is unchanged): fp16 mantissa bit rounding and int8 with a
per-token scale — their K/V bytes on the same store, and the test AUC of FPT+ trained on the demo store (ViT-Tiny
at 256, ``fpt demo``'s settings) with the option applied to its K/V.

    python -m fpt.bench.store_size                         # ViT-B at 512 (the paper's setting), 36 images
    python -m fpt.bench.store_size --lossy                 # + lossy options: bytes and demo AUC (trains 5 runs)

Sizes are apparent file sizes (``st_size``) summed over the official directory / the store directory. Our store
also holds what the official layout keeps elsewhere or recomputes (token indices, class-token feature, the
low-res image, labels/ids), so the comparison is given both for K/V only and for the whole store.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from fpt.bench.common import THREADS, WORK_DIR, ratio, write_results
from fpt.store import StoreReader, StoreWriter, as_dask, summarize

GOAL = 0.45            # ours / official, lossless
KV = ("keys", "values")


def official_bytes(kv_dir: Path) -> dict[str, float]:
    files = sorted(kv_dir.glob("*.safetensors"))
    sizes = [f.stat().st_size for f in files]
    return {"files": len(files), "bytes_per_image": float(np.mean(sizes))}


def store_bytes(path: Path) -> dict[str, object]:
    """Disk bytes per sample of the whole store and per array (from ``fpt inspect``'s summary)."""
    s = summarize(path)
    n = s["n_samples"]
    per_array = {a["name"]: a["disk_bytes"] / n for a in s["arrays"]}
    raw = {a["name"]: a["raw_bytes"] / n for a in s["arrays"]}
    return {"samples": n, "bytes_per_image": s["disk_bytes"] / n, "kv_bytes_per_image": sum(per_array[k] for k in KV),
            "kv_raw_fp16_bytes_per_image": sum(raw[k] for k in KV), "per_array_bytes_per_image": per_array}


def size_figure(model: str, res: int, n_train: int) -> dict:
    from fpt.bench.data import ensure_dataset
    data = ensure_dataset(model, res, n_train)
    official = official_bytes(data.official)
    ours = store_bytes(data.store)
    png = float(np.mean([p.stat().st_size for p in data.tree.rglob("*.png")]))
    return {
        "model": model, "res": res, "official": official, "ours": ours, "png_bytes_per_image": png,
        "ratio_kv": ratio(ours["kv_bytes_per_image"], official["bytes_per_image"]),
        "ratio_store": ratio(ours["bytes_per_image"], official["bytes_per_image"]),
        "ratio_with_images": ratio(ours["bytes_per_image"], official["bytes_per_image"] + png),
        "goal": GOAL, "goal_met": ratio(ours["bytes_per_image"], official["bytes_per_image"]) <= GOAL,
    }


# -- lossy options (bench only) ---------------------------------------------------------------------------------
def bit_round(x: np.ndarray, keep_bits: int) -> np.ndarray:
    """fp16 with its 10 mantissa bits rounded (to nearest) to ``keep_bits``; the dropped bits become zeros,
    which the byte-shuffled compressor then squeezes out."""
    drop = 10 - keep_bits
    bits = x.astype(np.float16).view(np.uint16).astype(np.uint32)
    bits = ((bits + (1 << (drop - 1))) >> drop) << drop if drop > 0 else bits
    return bits.astype(np.uint16).view(np.float16)


def int8_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., k, d] -> (int8 codes [..., k, d], fp16 scale [..., k, 1]); x ~ codes * scale."""
    scale = np.abs(x.astype(np.float32)).max(axis=-1, keepdims=True) / 127
    scale = np.where(scale == 0, 1, scale).astype(np.float16)
    codes = np.clip(np.round(x.astype(np.float32) / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return codes, scale


def compressed_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes of per-sample chunks (first axis = sample) under the store's default chunk codec (``fpt.store``'s
    ``DEFAULT_CODEC``), without shard indices and checksums: for layouts the store cannot hold (int8) and for
    outputs not written to a store (figure 5)."""
    from fpt.bench.codec import blosc_codec
    from fpt.store import CODECS, DEFAULT_CODEC
    codec = blosc_codec(*CODECS[DEFAULT_CODEC])
    return sum(len(codec.encode(np.ascontiguousarray(sample))) for a in arrays for sample in a)


def sample_store_bytes(out: dict, low: np.ndarray) -> dict[str, float]:
    """Compressed bytes per image our store would hold for one LPM output (``FrozenLPM`` dict, batch B) and its
    low-res copies uint8 [B, R, R, 3], per array and in total, with the dtypes the store uses."""
    arrays = {"keys": out["keys"].half().numpy(), "values": out["values"].half().numpy(),
              "indices": out["indices"].int().numpy(), "images": low}
    if "cls" in out:
        arrays["cls"] = out["cls"].half().numpy()
    per = {name: compressed_bytes([a]) / len(low) for name, a in arrays.items()}
    return {**per, "total": sum(per.values())}


def lossless(x: np.ndarray):
    return x, [x]


def rounded(keep_bits: int):
    def apply(x: np.ndarray):
        r = bit_round(x, keep_bits)
        return r, [r]
    return apply


def int8(x: np.ndarray):
    codes, scale = int8_per_token(x)
    return (codes * scale.astype(np.float32)).astype(np.float16), [codes, scale]


# option -> f(K or V fp16 [S, L, H, k, d]) -> (what training sees, fp16; the arrays that would be stored)
LOSSY = {"fp16 (lossless, as stored)": lossless, "bitround 7 mantissa bits": rounded(7),
         "bitround 5 mantissa bits": rounded(5), "bitround 3 mantissa bits": rounded(3),
         "int8 + fp16 scale per token": int8}


def rewrite_store(src: Path, dst: Path, transform) -> None:
    """A copy of store ``src`` at ``dst`` with keys/values replaced by ``transform(array)``, via the store API
    (read shard by shard through ``as_dask``, written with ``StoreWriter``)."""
    reader = StoreReader(src)
    g = reader.geometry
    arrays = as_dask(src)
    writer = StoreWriter.open(dst, g, reader.attrs, ids=reader.ids, labels=reader.labels, split=reader.split,
                              overwrite=True)
    for shard in range(g.n_shards()):
        rows = g.shard_range(shard)
        part = {n: arrays[n][rows.start:rows.stop].compute() for n in ("keys", "values", "indices", "cls", "images")}
        writer.write_shard(shard, {n: transform(a) if n in KV else a for n, a in part.items()})


def lossy_figure(store: Path, train_demo: bool, epochs: int | None) -> list[dict]:
    """Bytes per image of K/V under each lossy option (on ``store``), and, with ``train_demo``, the demo task's
    test AUC when FPT+ trains on the demo store with that option applied."""
    reader = StoreReader(store)
    kv = {n: as_dask(store)[n].compute() for n in KV}
    demo = demo_store() if train_demo else None
    rows = []
    for name, apply in LOSSY.items():
        parts = [apply(kv[k]) for k in KV]
        decoded, encoded = [p[0] for p in parts], [a for p in parts for a in p[1]]
        err = max(float(np.abs(d.astype(np.float32) - kv[k].astype(np.float32)).max()) for d, k in zip(decoded, KV))
        row = {"option": name, "kv_bytes_per_image": compressed_bytes(encoded) / reader.geometry.n_samples,
               "max_abs_error": err}
        if demo is not None:
            row["demo_test_auc"] = demo_auc(demo, name, lambda x, f=apply: f(x)[0], epochs)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["kv_bytes_per_image"]
    for row in rows:
        row["ratio_to_lossless"] = ratio(row["kv_bytes_per_image"], base)
        if "demo_test_auc" in row and rows[0].get("demo_test_auc") is not None:
            row["auc_change"] = round(row["demo_test_auc"] - rows[0]["demo_test_auc"], 4)
    return rows


def demo_store() -> Path:
    from fpt.config import extract_config
    from fpt.extract.run import extract
    out = WORK_DIR / "demo" / "demo.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract(extract_config("demo", out=out, device="cpu"))
    return out


def demo_auc(store: Path, option: str, transform, epochs: int | None) -> float:
    """Test AUC of FPT+ (demo settings) trained and tested on ``store`` with K/V passed through ``transform``."""
    from fpt.config import train_config
    from fpt.train.loop import train
    slug = "".join(c if c.isalnum() else "-" for c in option)
    variant = store.parent / f"{slug}.zarr"
    rewrite_store(store, variant, transform)
    out = store.parent / "runs" / slug
    if out.exists():
        import shutil
        shutil.rmtree(out)
    metrics = train(train_config(variant, "demo", out=out, device="cpu", epochs=epochs))
    return metrics.test["auc"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--lossy", action="store_true", help="also measure the lossy options (bytes + demo AUC)")
    p.add_argument("--epochs", type=int, default=None, help="demo training epochs for the lossy AUC runs")
    p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads per process")
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    sizes = size_figure(args.model, args.res, args.n_train)
    print(json.dumps({k: sizes[k] for k in ("ratio_kv", "ratio_store", "ratio_with_images", "goal_met")}))
    content = {"sizes": sizes}
    if args.lossy:
        from fpt.bench.data import ensure_dataset
        content["lossy"] = lossy_figure(ensure_dataset(args.model, args.res, args.n_train).store, True, args.epochs)
    out = write_results(f"store_size-{args.model}-{args.res}", "fpt.bench.store_size", threads=args.threads,
                        **content)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
