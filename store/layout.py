"""The on-disk layout of an fpt store (Zarr v3 group). Only fpt.store imports this module.

Schema version 1:

    keys, values  float16 [S, L, H, k, d]   K/V of the k selected tokens per layer and head
    indices       int32   [S, L, H, k]      token positions of the selection (0 = class token)
    cls           float16 [S, D]            the LPM's final normalised class-token feature
    images        uint8   [S, R, R, C]      low-resolution copy for the side network
    labels        int16   [S]
    split         uint8   [S]               0 train, 1 val, 2 test, 255 excluded (unreadable source, skipped)
    ids           string  [S]
    done          bool    [S]               set after every array of that sample is written

Per-sample arrays use one sample per inner chunk, grouped into shards of ``samples_per_shard`` samples; the
small 1-D arrays use one chunk per shard. A writer writes whole shards, so writers never share a file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
EXCLUDED_SPLIT = 255          # a sample whose source could not be read and was skipped (--on-error skip)
SKIPPED_REPORT = "skipped.csv"  # inside the store: index,id,error of every skipped sample

SAMPLE_ARRAYS = ("keys", "values", "indices", "cls", "images")   # written per shard by extraction
INDEX_ARRAYS = ("labels", "split", "ids")                          # written once, at creation
DONE = "done"
ARRAY_NAMES = (*SAMPLE_ARRAYS, *INDEX_ARRAYS, DONE)
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
            "ids": ((), "str"),
            DONE: ((), "bool"),
        }

    def bytes_per_sample(self) -> int:
        return sum(int(np.prod(shape)) * (np.dtype(dt).itemsize if dt != "str" else 32)
                   for shape, dt in self.sample_shapes().values())

    def n_shards(self) -> int:
        return -(-self.n_samples // self.samples_per_shard)

    def shard_range(self, shard: int) -> range:
        start = shard * self.samples_per_shard
        return range(start, min(start + self.samples_per_shard, self.n_samples))


def choose_samples_per_shard(bytes_per_sample: int, target_bytes: int = 64 << 20) -> int:
    """Shards of about ``target_bytes`` uncompressed: big enough for few files, small enough to buffer."""
    return int(max(1, min(1024, target_bytes // max(1, bytes_per_sample))))


# Blosc settings per --codec name, all lossless; chosen by measurement on LPM K/V (bench/codec.py, bench/README.md):
# zstd-1 + bit shuffle stores ViT-B/512 K/V at 0.44x the official fp32 files and encodes 4.9x faster than zstd-5 +
# byte shuffle (0.42x); lz4 is faster still but larger (0.45x).
CODECS = {"zstd-1": ("zstd", 1, "bitshuffle"), "zstd-5": ("zstd", 5, "shuffle"), "lz4": ("lz4", 5, "bitshuffle")}
DEFAULT_CODEC = "zstd-1"


def compressors(codec: str = DEFAULT_CODEC) -> list:
    """Blosc with the ``codec``'s compressor, level and shuffle, then a crc32c checksum on every chunk (shard
    indices carry one too)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    cname, level, shuffle = CODECS[codec]
    return [BloscCodec(cname=cname, clevel=level, shuffle=shuffle), Crc32cCodec()]
