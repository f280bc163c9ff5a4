"""Integrity checks of a store: which samples are unreadable, missing or fail their checksums."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from fpt.store.layout import ARRAY_NAMES, DONE, Geometry
from fpt.store.location import StoreLocation
from fpt.store.reader import open_group


@dataclass
class Problem:
    array: str
    samples: list[int]          # sample indices affected
    reason: str


@dataclass
class VerifyReport:
    path: str
    n_samples: int
    full: bool                  # True: every chunk was read and checksummed; False: files and metadata only
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_samples(self) -> np.ndarray:
        return np.unique(np.concatenate([np.asarray(p.samples, dtype=np.int64) for p in self.problems]
                                        or [np.zeros(0, np.int64)]))

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path | StoreLocation, arrays: tuple[str, ...] = ARRAY_NAMES, full: bool = True,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check ``arrays`` of the store shard by shard.

    Finds: array metadata that cannot be read, shard/chunk files missing for samples marked done, and (with
    ``full``) chunks whose crc32c checksum or decompression fails, narrowed down to single samples.
    """
    path = StoreLocation(path)
    group = open_group(path)
    g = Geometry(**group.attrs["geometry"])
    report = VerifyReport(str(path), g.n_samples, full)
    everything = list(range(g.n_samples))
    try:
        done = group[DONE][:]
    except Exception as e:
        done = np.ones(g.n_samples, dtype=bool)
        report.problems.append(Problem(DONE, everything, f"unreadable ({type(e).__name__})"))
    arrays = tuple(a for a in arrays if not (a == DONE and report.problems))
    for step, name in enumerate(arrays):
        try:
            arr = group[name]
        except Exception as e:
            report.problems.append(Problem(name, everything, f"array metadata unreadable ({type(e).__name__})"))
            continue
        for shard in range(g.n_shards()):
            rows = g.shard_range(shard)
            _check_shard(path, name, arr, shard, rows, done, full, report)
        if progress:
            progress(step + 1, len(arrays))
    return report


def _check_shard(path: StoreLocation, name: str, arr: zarr.Array, shard: int, rows: range, done: np.ndarray, full: bool,
                 report: VerifyReport) -> None:
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    done_rows = [i for i in rows if done[i]]
    if not path.is_file(f"{name}/{key}"):
        if done_rows:
            report.problems.append(Problem(name, done_rows, "shard file missing"))
        return
    if not full:
        return
    try:
        arr[rows.start:rows.stop]
        return
    except Exception:
        pass
    bad = []
    for i in rows:                                  # narrow down to the samples whose chunks fail
        try:
            arr[i]
        except Exception:
            bad.append(i)
    report.problems.append(Problem(name, bad or list(rows), "checksum or decode error"))
