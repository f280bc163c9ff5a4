"""Integrity checks of a store: which samples are unfinished, unreadable, missing or fail their checksums, and
the repair path: ``mark_for_reextraction`` sets the damaged samples' shards back to not done, so that re-running
the same ``fpt extract`` rewrites exactly those shards, whole."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from fpt import FptError
from fpt.store.layout import ARRAY_NAMES, DONE, SAMPLE_ARRAYS, Geometry
from fpt.store.location import StoreLocation
from fpt.store.lock import StoreLock
from fpt.store.reader import StoreReader, check_attributes, open_group

NOT_EXTRACTED = "not extracted yet"
FINISH = "re-run the same `fpt extract` command"
CHECKSUM_BELOW_BYTES = 2 << 30      # ``verify(full=None)`` reads and checksums every chunk of stores under this


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
    ids: np.ndarray | None = None   # the samples' ids, read where there are problems to name (and they can be)

    def named(self, samples: list[int]) -> list[str]:
        """Samples by their ids (by index where the ids cannot be read)."""
        return [str(i if self.ids is None else self.ids[i]) for i in samples]

    @property
    def bad_samples(self) -> np.ndarray:
        """Every sample affected by any problem, unfinished ones included."""
        return _union(self.problems)

    @property
    def not_extracted(self) -> np.ndarray:
        """Samples whose shard was never finished (``done`` false): an interrupted extraction."""
        return _union([p for p in self.problems if p.reason == NOT_EXTRACTED])

    @property
    def damaged(self) -> np.ndarray:
        """Samples marked done whose data is missing or corrupt."""
        return _union([p for p in self.problems if p.reason != NOT_EXTRACTED])

    @property
    def beyond_repair(self) -> list[Problem]:
        """Damage that re-extracting samples cannot rewrite: unreadable array metadata, or ``labels``/``split``/
        ``ids`` (written once, at creation). The store is then replaced: ``fpt extract ... --overwrite``."""
        fixable = (*SAMPLE_ARRAYS, DONE)
        return [p for p in self.problems
                if p.reason != NOT_EXTRACTED and (p.array not in fixable or "metadata" in p.reason)]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: what is wrong and the command that fixes it."""
        if self.ok:
            return f"{self.path}: ok, {self.n_samples} samples" + (", every chunk checksummed" if self.full else "")
        parts = []
        if self.beyond_repair:
            p = self.beyond_repair[0]
            parts.append(f"{p.array} is damaged ({p.reason}), which re-extracting samples cannot rewrite: replace "
                         "the store with `fpt extract ... --overwrite`")
        elif len(self.damaged):
            parts.append(f"{len(self.damaged)} of {self.n_samples} samples are missing or corrupt: "
                         f"`fpt store verify {self.path} --repair` marks their shards for re-extraction, then "
                         f"{FINISH} rewrites them")
        unfinished = np.setdiff1d(self.not_extracted, self.damaged)
        if len(unfinished):
            parts.append(f"{len(unfinished)} of {self.n_samples} samples are {NOT_EXTRACTED} (an interrupted "
                         f"extraction): {FINISH} to finish them")
        return f"{self.path}: " + "; ".join(parts)


def _union(problems: list[Problem]) -> np.ndarray:
    return np.unique(np.concatenate([np.asarray(p.samples, dtype=np.int64) for p in problems]
                                    or [np.zeros(0, np.int64)]))


def verify(path: str | Path | StoreLocation, arrays: tuple[str, ...] = ARRAY_NAMES, full: bool | None = True,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check ``arrays`` of the store shard by shard (``full`` None: checksums of stores under
    ``CHECKSUM_BELOW_BYTES`` on disk, files and metadata only of larger ones).

    Finds: samples not marked done (when ``done`` is among ``arrays``), array metadata that cannot be read,
    shard/chunk files missing for samples marked done, and (with ``full``) chunks whose crc32c checksum or
    decompression fails, naming the samples of the failing chunk: the shard's (one chunk per shard), or a single
    sample where a chunk holds one (keys and values of stores written before 2026-11-27).
    """
    path = StoreLocation(path)
    group = open_group(path)
    g = check_attributes(path, group)
    full = path.size() < CHECKSUM_BELOW_BYTES if full is None else full
    report = VerifyReport(str(path), g.n_samples, full)
    everything = list(range(g.n_samples))
    done = _read_done(group, g, report)
    if DONE in arrays and not done.all():
        report.problems.append(Problem(DONE, np.flatnonzero(~done).tolist(), NOT_EXTRACTED))
    arrays = tuple(a for a in arrays if a != DONE)            # read whole just now
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
    if report.problems:
        report.ids = _readable_ids(path)
    return report


def _readable_ids(path: StoreLocation) -> np.ndarray | None:
    """The store's sample ids; None where they cannot be read (damage that ``verify`` reports by itself)."""
    try:
        return StoreReader(path).ids
    except Exception:       # noqa: BLE001 - any damage: the samples are then named by index
        return None


def _read_done(group: zarr.Group, g: Geometry, report: VerifyReport) -> np.ndarray:
    """The ``done`` flags; samples whose flags cannot be read are reported and count as done, so that their
    other arrays are still checked."""
    try:
        arr = group[DONE]
    except Exception as e:
        report.problems.append(Problem(DONE, list(range(g.n_samples)),
                                       f"array metadata unreadable ({type(e).__name__})"))
        return np.ones(g.n_samples, dtype=bool)
    try:
        return arr[:]
    except Exception:
        pass
    done = np.ones(g.n_samples, dtype=bool)
    for shard in range(g.n_shards()):                     # one chunk per shard: find the unreadable ones
        rows = g.shard_range(shard)
        try:
            done[rows.start:rows.stop] = arr[rows.start:rows.stop]
        except Exception as e:
            report.problems.append(Problem(DONE, list(rows), f"checksum or decode error ({type(e).__name__})"))
    return done


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


def mark_for_reextraction(path: str | Path | StoreLocation) -> list[int]:
    """Verify the store fully and set ``done`` to false for every shard holding a damaged sample; returns those
    shards. Re-running the same ``fpt extract`` then rewrites each of them whole (no old bytes are read).

    Damage that re-extraction cannot rewrite (unreadable array metadata; ``labels``/``split``/``ids``, which are
    written once at creation) is refused with the fix: re-extract with ``--overwrite``. Holds the store's lock,
    so it never races an extraction.
    """
    path = StoreLocation(path)
    with StoreLock(path):
        report = verify(path)
        if report.beyond_repair:
            p = report.beyond_repair[0]
            raise FptError(f"{path}: {p.array} is damaged ({p.reason}), which re-extracting samples cannot "
                           "rewrite; replace the store with `fpt extract ... --overwrite`")
        g = check_attributes(path, open_group(path))
        shards = sorted({int(i) // g.samples_per_shard for i in report.damaged})
        with zarr.config.set({"array.write_empty_chunks": True}):   # a missing chunk must always mean lost data
            done = open_group(path, mode="r+")[DONE]
            for shard in shards:
                rows = g.shard_range(shard)
                done[rows.start:rows.stop] = False        # the whole chunk: replaces a corrupt one too
    return shards
