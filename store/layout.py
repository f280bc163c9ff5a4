"""The on-disk layout of an fpt store (Zarr v3 group). Only fpt.store imports this module.

Schema version 2 (every array carries ``dimension_names`` and a ``description`` attribute):

    keys, values  float16 [S, L, H, k, d]   K/V of the k selected tokens per layer and head
    indices       int32   [S, L, H, k]      token positions of the selection (0 = class token)
    cls           float16 [S, D]            the LPM's final normalised class-token feature
    images        uint8   [S, R, R, C]      low-resolution copy for the side network
    labels        int16   [S]
    split         uint8   [S]               0 train, 1 val, 2 test, 255 excluded (unreadable source, skipped)
    ids           uint8   [S, n]            the sample id as UTF-8 bytes, zero-padded to n (a core Zarr v3
                                            type: zarr-python's variable-length strings are an extension that
                                            other readers, e.g. tensorstore, lack)
    done          bool    [S]               set after every array of that sample is written

Every per-sample array has one chunk per shard of ``samples_per_shard`` samples: one file per shard and array,
checksummed (crc32c), written whole by one writer, so writers never share a file. ``keys`` and ``values`` had one
sample per inner chunk inside shard files until 2026-11-27, so that one sample could be read (and its checksum
failure narrowed down) alone; but zarr treats every inner chunk of a shard write as partial: it fills a buffer,
copies the chunk into it, and copies the encoded chunks once more into the shard. One chunk per shard writes a
shard with 25-40 % less CPU with ``--codec none`` (dev box, the LPM's real ViT-B output: 5.3-6.3 -> 3.7-4.6 ms per
image at 512, 24-25 -> 15-16 at 1024), 10-20 % less with zstd-1 at 1024, and no measurable gain with zstd-1 at 512,
where zstd's own time dominates; the writers' CPU is what limits extraction on a GPU host. The price: a corrupt
chunk names its shard's samples (``fpt store verify --repair`` re-extracts whole shards either way), and reading
one sample decompresses its shard's chunk. For the small arrays (cls, indices, images) one chunk per shard came
first: zarr's fixed cost per chunk outweighed their few KB (writing them 3.7 -> 1.6 ms of CPU per image). Stores
written before shard K/V, or, before that, every per-sample array; zarr.json says which, and every reader reads all
three. A sample never written (``done`` false after an interrupted run) reads back as NaN keys/values/cls and -1
indices (the fill values), never as plausible zeros; a shard that ``fpt store verify --repair`` marked (``done``
false again) keeps its damaged chunks until it is re-extracted: ``done`` says which samples hold data. Version 1
stored ``ids`` as variable-length strings and had no dimension names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from fpt import FptError

SCHEMA_VERSION = 2
SPLITS = ("train", "val", "test")
EXCLUDED_SPLIT = 255          # a sample whose source could not be read and was skipped (--on-error skip)
SKIPPED_REPORT = "skipped.csv"  # inside the store: index,id,error of every skipped sample

SAMPLE_ARRAYS = ("keys", "values", "indices", "cls", "images")   # written per shard by extraction
SHARDED_ARRAYS: tuple[str, ...] = ()   # one sample per inner chunk, in shards: none (K/V until 2026-11-27)
INDEX_ARRAYS = ("labels", "split", "ids")                          # written once, at creation
DONE = "done"
ARRAY_NAMES = (*SAMPLE_ARRAYS, *INDEX_ARRAYS, DONE)
# Axis names, in every array's zarr.json (``dimension_names``) for xarray, tensorstore and other readers.
DIMENSION_NAMES = {
    "keys": ("sample", "layer", "head", "token", "head_dim"),
    "values": ("sample", "layer", "head", "token", "head_dim"),
    "indices": ("sample", "layer", "head", "token"),
    "cls": ("sample", "embed_dim"),
    "images": ("sample", "y", "x", "channel"),
    "labels": ("sample",),
    "split": ("sample",),
    "ids": ("sample", "utf8_byte"),
    DONE: ("sample",),
}
SPLIT_CODES = {**{str(i): s for i, s in enumerate(SPLITS)},
               str(EXCLUDED_SPLIT): "excluded: the source could not be read and was skipped (--on-error skip)"}
# What a sample not yet extracted reads as: impossible values, so that an unfinished store cannot pass for data.
FILL_VALUES = {"keys": float("nan"), "values": float("nan"), "cls": float("nan"), "indices": -1, "images": 0,
               "labels": 0, "split": 0, "ids": 0, DONE: False}
ARRAY_ATTRS = {
    "keys": {"description": "keys of the k selected tokens per extracted layer and head (after the qkv "
                            "projection, and q/k norm where the LPM has one); token axis: most important first"},
    "values": {"description": "values of the k selected tokens per extracted layer and head; token axis as keys"},
    "indices": {"description": "position in the LPM's token sequence of each selected token: the backbone's "
                               "prefix tokens first (0 = class token, then any registers), then the patches in "
                               "row-major order; -1 = sample not extracted yet"},
    "cls": {"description": "the LPM's final normalised class-token feature"},
    "images": {"description": "low-resolution RGB copy of the LPM's input (area-averaged) for the side network"},
    "labels": {"description": "class index into the group attribute dataset.classes"},
    "split": {"description": "split code per sample", "codes": SPLIT_CODES},
    "ids": {"description": "sample id (source path) as UTF-8 bytes, zero-padded to the row width",
            "decode": "bytes(row).rstrip(b'\\0').decode('utf-8')"},
    DONE: {"description": "true once every array of the sample's shard is written; false: not extracted yet "
                          "(keys/values/cls read NaN, indices -1)"},
}

# dtypes of the LPM's outputs as stored (extraction and prediction cast to these, so both see the same numbers)
FEATURE_DTYPES = {"keys": "float16", "values": "float16", "indices": "int32", "cls": "float16"}


@dataclass(frozen=True)
class Geometry:
    """Shapes that fix the store's arrays."""
    n_samples: int
    layers: int          # L
    heads: int           # H
    k: int               # selected tokens per head
    head_dim: int        # d
    embed_dim: int       # D
    image_res: int       # R
    channels: int = 3
    samples_per_shard: int = 64
    id_bytes: int = 0    # width of the ``ids`` rows (the longest UTF-8 id); 0 = taken from the ids at creation

    def sample_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-sample shape and dtype of each array (without the leading S)."""
        L, H, k, d = self.layers, self.heads, self.k, self.head_dim
        return {
            "keys": ((L, H, k, d), FEATURE_DTYPES["keys"]),
            "values": ((L, H, k, d), FEATURE_DTYPES["values"]),
            "indices": ((L, H, k), FEATURE_DTYPES["indices"]),
            "cls": ((self.embed_dim,), FEATURE_DTYPES["cls"]),
            "images": ((self.image_res, self.image_res, self.channels), "uint8"),
            "labels": ((), "int16"),
            "split": ((), "uint8"),
            "ids": ((self.id_bytes,), "uint8"),
            DONE: ((), "bool"),
        }

    def shard_shapes(self, shard: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """[n, ...] shape and dtype of each per-sample array of ``shard`` (what ``StoreWriter.write_shard`` takes;
        n = the shard's samples: shard 0 is the largest)."""
        n = len(self.shard_range(shard))
        return {name: ((n, *shape), dtype) for name, (shape, dtype) in self.sample_shapes().items()
                if name in SAMPLE_ARRAYS}

    def bytes_per_sample(self) -> int:
        return sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in self.sample_shapes().values())

    def n_shards(self) -> int:
        return -(-self.n_samples // self.samples_per_shard)

    def shard_range(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.n_samples))


def encode_ids(ids) -> np.ndarray:
    """Sample ids -> uint8 [S, n]: UTF-8 bytes, zero-padded to the longest (n >= 1). Ids hold no NUL byte."""
    encoded = []
    for i in map(str, ids):
        try:
            encoded.append(i.encode("utf-8"))
        except UnicodeEncodeError:      # a file name of bytes that are not UTF-8 (Python keeps them as surrogates)
            raise FptError(f"sample id {i.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8 (a file name "
                           "in another encoding?); rename the file") from None
    if any(b"\0" in e for e in encoded):
        raise ValueError("sample ids must not contain NUL characters")
    width = max([1, *map(len, encoded)])
    return np.frombuffer(b"".join(e.ljust(width, b"\0") for e in encoded), dtype=np.uint8).reshape(len(encoded), width)


def decode_ids(rows: np.ndarray) -> list[str]:
    """uint8 [S, n] from ``encode_ids`` -> the ids."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    return [b.decode("utf-8") for b in rows.view(f"S{rows.shape[1]}").ravel()]   # numpy's S drops the padding


def group_attrs(g: Geometry) -> dict:
    """What a Zarr reader needs to know about the whole group (stored as the ``layout`` attribute)."""
    return {
        "samples_per_shard": g.samples_per_shard,
        "split_codes": SPLIT_CODES,
        "unfinished": "samples with done = false hold no data: not extracted yet (NaN keys/values/cls, -1 "
                      "indices), or marked for re-extraction by `fpt store verify --repair` (their damaged chunks "
                      "stay until then); re-run the same `fpt extract` command to finish them",
        "ids": "uint8 [S, n]: UTF-8 bytes, zero-padded; decode each row with bytes(row).rstrip(b'\\0').decode()",
        "dask": "dask.array.from_zarr(group[name]) makes one task per chunk, here one per shard file; in stores "
                "with sharded arrays (keys, values before 2026-11-27) one per sample: pass chunks=group[name].shards "
                "or group[name].chunks for one task per shard file, as fpt.store.as_dask does",
    }


def choose_samples_per_shard(bytes_per_sample: int, target_bytes: int = 64 << 20) -> int:
    """Shards of about ``target_bytes`` uncompressed: big enough for few files, small enough to buffer."""
    return int(max(1, min(1024, target_bytes // max(1, bytes_per_sample))))


# Blosc settings per --codec name: (compressor, level, shuffle, block size in bytes; 0 = Blosc's automatic one),
# all lossless, chosen by measurement on LPM output (bench/codec.py, figure 7 of bench/README.md). Blosc compresses
# each block on its own: with 512 KB blocks instead of its automatic tens of KB, zstd-1 + byte shuffle keeps a
# ViT-B store at 0.426-0.435x the official fp32 files (goal <= 0.45x) and encodes 2.4-3x faster than zstd-3 + bit
# shuffle with automatic blocks (0.434-0.445x, the earlier default; stores written before this change under the
# name zstd-1 used bit shuffle and automatic blocks: each array's zarr.json says what it holds). zstd-5 is the
# smallest and slowest, lz4 the fastest and largest of the compressed ones. ``none`` (None) stores the bytes as they
# are, checksummed: fp16 K/V compress only to ~0.85 of their size, so on a host whose CPUs limit extraction it
# halves the writers' CPU per image for a store ~1.2x larger (0.52x the official files; bench/README.md figure 7).
CODECS: dict[str, tuple[str, int, str, int] | None] = {
    "zstd-1": ("zstd", 1, "shuffle", 512 << 10), "zstd-3": ("zstd", 3, "bitshuffle", 0),
    "zstd-5": ("zstd", 5, "shuffle", 0), "lz4": ("lz4", 5, "bitshuffle", 0), "none": None}
DEFAULT_CODEC = "zstd-1"


def compressors(codec: str = DEFAULT_CODEC) -> list:
    """Blosc with the ``codec``'s compressor, level and shuffle (none for ``none``), then a crc32c checksum on
    every chunk (shard indices carry one too)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if CODECS[codec] is None:
        return [Crc32cCodec()]
    cname, level, shuffle, blocksize = CODECS[codec]
    return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle, blocksize=blocksize), Crc32cCodec()]
