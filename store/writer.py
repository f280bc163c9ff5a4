"""StoreWriter: creates a store, writes whole shards, marks samples done last."""
from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr

from fpt import FptError, __version__
from fpt.store.layout import (ARRAY_ATTRS, DEFAULT_CODEC, DIMENSION_NAMES, DONE, EXCLUDED_SPLIT, FILL_VALUES,
                              SAMPLE_ARRAYS, SCHEMA_VERSION, SHARDED_ARRAYS, SKIPPED_REPORT, Geometry, compressors,
                              decode_ids, encode_ids, group_attrs)
from fpt.store.location import StoreLocation
from fpt.store.reader import open_group

# beside a store that ``fpt extract --overwrite`` is replacing: the store it replaces, until the new one is complete
REPLACED_SUFFIX = ".replaced"
# attrs sections that define what a store contains; a re-run must ask for exactly these. Settings the user
# chose are compared before the backbone's derived facts, so a refusal names the option that changed.
IDENTITY_SECTIONS = ("extraction", "normalization", "dataset", "backbone")
VOLATILE_KEYS = ("counts",)   # derived from the sample list, compared through the ids instead
# identity keys that stores written before them lack, and what such a store holds: None = unknown (not compared;
# the precision of then depended on the device), else the value it was written with (every store before
# ``j2k_decode`` decoded JPEG 2000 in full, and every store before ``low_res`` made its low-res copies with PIL's
# BOX resize), so that a resumed extraction never mixes two settings
LATER_KEYS = {("extraction", "precision"): None, ("extraction", "j2k_decode"): "full",
              ("extraction", "low_res"): "pil-box", ("backbone", "published_params"): None}


class StoreWriter:
    """Writes one store. Safe to use from several processes as long as each writes different shards."""

    def __init__(self, location: StoreLocation, group: zarr.Group, geometry: Geometry, direct_io: bool = False,
                 replaced: StoreLocation | None = None):
        self.location = location
        self.group = group
        self.replaced = replaced            # the store this one replaces, kept until this one is complete
        self.geometry = geometry
        self.direct_io = direct_io          # how its group was opened: writer processes open it the same way
        self._arrays: dict[str, zarr.Array] = {}

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | StoreLocation, geometry: Geometry, attrs: Mapping[str, Any], ids: np.ndarray,
             labels: np.ndarray, split: np.ndarray, overwrite: bool = False, codec: str = DEFAULT_CODEC,
             direct_io: bool = True) -> "StoreWriter":
        """Create the store at ``path``, or reopen it for resuming when it holds the same extraction.

        An existing store that differs in backbone, extraction settings, dataset or sample ids is refused
        unless ``overwrite``, which replaces any fpt store there (never anything else) without losing it until
        the new one is complete: the old store is moved beside it (``<store>.replaced``, ``self.replaced``) and
        removed by ``replacing`` once every shard of the new one is written. An --overwrite that stopped early
        resumes when asked for the same extraction again (else its unfinished store is dropped); the store it
        replaced stays where it was put. ``codec`` (a name in layout.CODECS) applies to a new store; a resumed
        store keeps the codec it was created with. ``direct_io``: a local store's shard files are written past
        the page cache where the filesystem allows it (direct_io.py says why and what it costs).
        """
        path = StoreLocation(path)
        exists = _store_exists(path)
        replaced = path.beside(REPLACED_SUFFIX)
        if exists and overwrite:
            check_replaceable(path)
            if replaced.exists():       # {path}: the unfinished store of an --overwrite that stopped
                group = open_group(path, mode="r+", direct_io=direct_io)
                if _other_extraction(group, attrs, ids) is None:
                    return cls(path, group, Geometry(**group.attrs["geometry"]), direct_io, replaced)
                path.remove()
            else:
                path.move_to(replaced)
            return cls._create(path, geometry, attrs, ids, labels, split, codec, direct_io, replaced)
        if exists:
            group = open_group(path, mode="r+", direct_io=direct_io)
            _refuse_other_extraction(path, group, attrs, ids)
            return cls(path, group, Geometry(**group.attrs["geometry"]), direct_io,
                       replaced if replaced.exists() else None)
        return cls._create(path, geometry, attrs, ids, labels, split, codec, direct_io)

    @contextmanager
    def replacing(self) -> Iterator[None]:
        """Around the writing of a store that replaces another (``open`` with ``overwrite``; otherwise nothing
        happens): once every shard is written, the replaced store is removed; an FptError says where it is kept."""
        try:
            yield
        except FptError as e:
            if self.replaced is None or not self.replaced.exists():
                raise
            raise FptError(f"{e} (the store this --overwrite replaces is kept at {self.replaced} until the new "
                           "one is complete)") from None
        if self.replaced is not None and not self.pending_shards() and self.replaced.exists():
            self.replaced.remove()

    @classmethod
    def reopen(cls, path: str | Path | StoreLocation, direct_io: bool = True) -> "StoreWriter":
        """Open an existing store to write shards (a worker of a run that ``open`` already checked)."""
        path = StoreLocation(path)
        group = open_group(path, mode="r+", direct_io=direct_io)
        return cls(path, group, Geometry(**group.attrs["geometry"]), direct_io)

    @classmethod
    def _create(cls, path: StoreLocation, g: Geometry, attrs: Mapping[str, Any], ids: np.ndarray, labels: np.ndarray,
                split: np.ndarray, codec: str, direct_io: bool, replaced: StoreLocation | None = None
                ) -> "StoreWriter":
        group = zarr.open_group(path.zarr_target(direct_io), mode="w", zarr_format=3)
        encoded_ids = encode_ids(ids)
        # a shard never holds more samples than the store: a --shard-size of 10^8 would make every array's one
        # chunk that long (zarr fills a whole chunk in memory: gigabytes for a few images)
        g = replace(g, id_bytes=encoded_ids.shape[1], samples_per_shard=max(1, min(g.samples_per_shard, g.n_samples)))
        S, per = g.n_samples, g.samples_per_shard
        writer = cls(path, group, g, direct_io, replaced)
        for name, (shape, dtype) in g.sample_shapes().items():
            sharded = name in SHARDED_ARRAYS
            group.create_array(name, shape=(S, *shape), dtype=dtype, chunks=(1 if sharded else per, *shape),
                               shards=(per, *shape) if sharded else None, compressors=compressors(codec),
                               fill_value=FILL_VALUES[name], dimension_names=DIMENSION_NAMES[name],
                               attributes=ARRAY_ATTRS[name])
        writer._array("ids")[:] = encoded_ids
        writer._array("labels")[:] = labels.astype(np.int16)
        writer._array("split")[:] = split.astype(np.uint8)
        writer._array(DONE)[:] = False
        group.attrs.update({
            **attrs,
            "fpt_store_version": SCHEMA_VERSION,
            "fpt_version": __version__,
            "geometry": g.__dict__,
            "storage": {"codec": codec},
            "layout": group_attrs(g),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        return writer

    def _array(self, name: str) -> zarr.Array:
        # Opened once per writer: opening reads and parses the array's zarr.json (a round trip on a URL), which
        # cost ~10 % of a shard's write when done per shard. Every chunk is written, even one equal to the fill
        # value, so a missing file always means lost data.
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def open_arrays(self) -> None:
        """Open every array a shard's write touches, now rather than at the first shard (a writer process does
        this as it starts, while the first shard is being computed)."""
        for name in (*SAMPLE_ARRAYS, "split", DONE):
            self._array(name)

    # -- writing ---------------------------------------------------------------------------------------------
    def pending_shards(self) -> list[int]:
        """Shards not all done; a shard whose ``done`` flags cannot be read (a corrupt chunk) is pending too: it is
        rewritten whole, its flags last."""
        g, done = self.geometry, self.group[DONE]
        try:
            flags = done[:]
        except Exception:  # noqa: BLE001 - zarr's codecs raise their own (ValueError for a bad checksum)
            return [s for s in range(g.n_shards()) if not self._shard_done(s)]
        return [s for s in range(g.n_shards()) if not flags[g.shard_range(s)].all()]

    def _shard_done(self, shard: int) -> bool:
        """Whether every sample of ``shard`` is done; False when its flags cannot be read."""
        try:
            rows = self.geometry.shard_range(shard)
            return bool(self.group[DONE][rows.start:rows.stop].all())
        except Exception:  # noqa: BLE001 - as in pending_shards
            return False

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray], excluded: Sequence[int] = ()) -> None:
        """Write every sample array of one shard, then its ``done`` flags.

        arrays: ``keys``/``values`` [n, L, H, k, d], ``indices`` [n, L, H, k], ``cls`` [n, D],
        ``images`` [n, R, R, C] with n = the shard's sample count. ``excluded``: sample indices (global) whose
        source was unreadable; their split becomes EXCLUDED_SPLIT so no reader ever uses them.
        """
        rows = self.geometry.shard_range(shard)
        sel = slice(rows.start, rows.stop)
        if excluded:
            split = self._array("split")
            values = split[sel]
            values[np.asarray(excluded) - rows.start] = EXCLUDED_SPLIT
            split[sel] = values
        for name in SAMPLE_ARRAYS:
            data = np.asarray(arrays[name])
            array = self._array(name)
            if data.shape != (len(rows), *array.shape[1:]):
                raise ValueError(f"{name}: shard {shard} expects shape {(len(rows), *array.shape[1:])}, "
                                 f"got {data.shape}")
            array[sel] = data
        self._array(DONE)[sel] = True

    def record_skipped(self, entries: Sequence[tuple[int, str, str]]) -> str:
        """Add (index, id, error) rows to the store's skipped-sample report; returns where it is."""
        text = io.StringIO(newline="")
        out = csv.writer(text)
        if self.location.is_file(SKIPPED_REPORT):
            text.write(self.location.read_bytes(SKIPPED_REPORT).decode())
        else:
            out.writerow(["index", "id", "error"])
        out.writerows(entries)
        self.location.write_bytes(SKIPPED_REPORT, text.getvalue().encode())
        return f"{self.location}/{SKIPPED_REPORT}"

    def update_attrs(self, **sections: Any) -> None:
        self.group.attrs.update(sections)


def check_same_extraction(path: str | Path | StoreLocation, attrs: Mapping[str, Any], ids: np.ndarray) -> None:
    """Before the expensive part: refuse an existing store at ``path`` that differs from the keys ``attrs``
    gives (the settings known before the LPM is loaded) or from ``ids``. No store there: nothing to check."""
    path = StoreLocation(path)
    if path.is_file("zarr.json"):
        _refuse_other_extraction(path, open_group(path), attrs, ids, partial=True)


def check_replaceable(path: str | Path | StoreLocation) -> None:
    """Refuse, before the expensive part, what ``StoreWriter.open`` with ``overwrite`` would not replace at
    ``path``: anything but an fpt store; and a store beside which an earlier --overwrite kept the one it replaced
    (``<store>.replaced``), unless it is that --overwrite's unfinished store. Nothing there: nothing to check."""
    path = StoreLocation(path)
    if not _store_exists(path):
        return
    version = _schema_version(path)
    if version is None:
        raise FptError(f"{path} is a Zarr store that fpt did not write; choose another --out (it is never "
                       "replaced, even with --overwrite)")
    replaced = path.beside(REPLACED_SUFFIX)
    if replaced.exists() and (version != SCHEMA_VERSION or open_group(path)[DONE][:].all()):
        raise FptError(f"{replaced} holds the store an earlier --overwrite replaced, and {path} is not the "
                       f"unfinished store of that --overwrite; delete or move {replaced}, then re-run")


def _store_exists(path: StoreLocation) -> bool:
    """Whether a store is at ``path``: False when nothing is there; something that is not a Zarr store (a folder
    of other files) is refused."""
    if not path.exists():
        return False
    if not path.is_file("zarr.json"):
        raise FptError(f"{path} exists and is not an fpt store; choose another --out "
                       "(it is never replaced, even with --overwrite)")
    return True


def _schema_version(path: StoreLocation) -> Any:
    """The ``fpt_store_version`` of the Zarr group at ``path``; None for one that fpt did not write (or
    unreadable metadata)."""
    try:
        meta = json.loads(path.read_bytes("zarr.json"))
    except (OSError, ValueError):
        return None
    attributes = meta.get("attributes") if isinstance(meta, dict) else None
    return attributes.get("fpt_store_version") if isinstance(attributes, dict) else None


def _other_extraction(group: zarr.Group, attrs: Mapping[str, Any], ids: np.ndarray, partial: bool = False
                      ) -> str | None:
    """How the store ``group`` differs from the extraction ``attrs`` and ``ids`` describe (None: it holds it)."""
    problem = _identity_difference(dict(group.attrs), attrs, partial)
    if problem is None and decode_ids(group["ids"][:]) != [str(i) for i in ids]:
        problem = "the sample ids differ (the data changed)"
    return problem


def _refuse_other_extraction(path: StoreLocation, group: zarr.Group, attrs: Mapping[str, Any], ids: np.ndarray,
                             partial: bool = False) -> None:
    problem = _other_extraction(group, attrs, ids, partial)
    if problem:
        replaced = path.beside(REPLACED_SUFFIX)
        kept = (f"; it is the unfinished store of an --overwrite that stopped, and the store that one replaced is "
                f"kept at {replaced}: to go back to it, delete {path} and rename {replaced} to {path}"
                if replaced.exists() else "")
        raise FptError(f"{path} holds a different extraction ({problem}); "
                       f"pass --overwrite to replace it or --out to write elsewhere{kept}")


def _identity_difference(stored: Mapping[str, Any], wanted: Mapping[str, Any], partial: bool = False) -> str | None:
    """The first differing ``section.key``; ``partial``: only the sections and keys ``wanted`` gives."""
    for section in IDENTITY_SECTIONS:
        if partial and section not in wanted:
            continue
        a = {k: v for k, v in (stored.get(section) or {}).items() if k not in VOLATILE_KEYS}
        b = {k: v for k, v in _as_stored(wanted.get(section) or {}).items() if k not in VOLATILE_KEYS}
        for key in sorted(set(b) if partial else set(a) | set(b)):
            if key not in a and (section, key) in LATER_KEYS:
                if LATER_KEYS[section, key] is None:
                    continue
                a[key] = LATER_KEYS[section, key]
            if a.get(key) != b.get(key):
                return f"{section}.{key}: stored {a.get(key)!r}, requested {b.get(key)!r}"
    return None


def _as_stored(value: Any) -> Any:
    """What ``value`` looks like after a round trip through zarr.json (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: _as_stored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_stored(v) for v in value]
    return value


__all__ = ["StoreWriter", "check_replaceable", "check_same_extraction"]
