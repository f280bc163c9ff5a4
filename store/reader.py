"""Reading a store: StoreReader for training, ``as_dask`` for notebooks, ``summarize`` for ``fpt inspect``."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import zarr
from zarr.buffer.cpu import NDBuffer

if TYPE_CHECKING:
    import dask.array

from fpt import FptError
from fpt.store.layout import ARRAY_NAMES, DONE, SCHEMA_VERSION, SPLITS, Geometry, decode_ids
from fpt.store.location import StoreLocation


def open_group(path: str | Path | StoreLocation, mode: str = "r", direct_io: bool = False) -> zarr.Group:
    """Open an fpt store's Zarr group (local path or URL), refusing anything that is not a store of this
    schema version. ``direct_io``: write its big files past the page cache (``StoreLocation.zarr_target``)."""
    path = StoreLocation(path)
    if not path.is_file("zarr.json"):
        if not path.exists():
            raise FptError(f"{path} does not exist; create a store with `fpt extract`")
        raise FptError(f"{path} is not an fpt store (no zarr.json); create one with `fpt extract`")
    try:
        group = zarr.open_group(path.zarr_target(direct_io), mode=mode, zarr_format=3)
        version = group.attrs.get("fpt_store_version")
    except zarr.errors.ContainsArrayError:
        raise FptError(f"{path} is one array of a store, not a store; name the store's folder (its parent)") from None
    except Exception as e:  # unreadable / truncated metadata
        raise FptError(f"{path}: cannot read store metadata ({type(e).__name__}: {e})") from None
    if version is None:
        raise FptError(f"{path} is a Zarr store that fpt did not write (its attributes name no fpt_store_version)")
    if version != SCHEMA_VERSION:
        raise FptError(f"{path}: store schema version {version}, this fpt reads version {SCHEMA_VERSION}; "
                       "re-extract it with this fpt (`fpt extract ... --overwrite`)")
    return group


REQUIRED_SECTIONS = ("backbone", "extraction", "dataset", "normalization", "geometry")   # of the group's attrs
# what every schema-2 store has held in each section since the schema began (later keys are read with defaults)
REQUIRED_KEYS = {
    "backbone": ("name", "embed_dim", "heads", "head_dim", "patch_size", "depth", "prefix_tokens", "n_params",
                 "weights_sha256", "weights_source", "random_init"),
    "extraction": ("res", "layers", "token_ratio", "k", "importance", "dtype", "image_res"),
    "dataset": ("name", "classes", "source", "counts"),
    "normalization": ("mean", "std"),
}
EDITED = "the store was edited or damaged: re-extract it (fpt extract ... --overwrite)"


def check_attributes(path: StoreLocation, group: zarr.Group) -> Geometry:
    """The store's geometry, once its attributes are as fpt writes them (every section with its keys, a geometry,
    two classes or more). A store edited or damaged by hand is one error, not a KeyError or IndexError later."""
    missing = [s for s in REQUIRED_SECTIONS if not isinstance(group.attrs.get(s), dict)]
    if missing:
        raise FptError(f"{path}: the store's attributes lack {', '.join(missing)}; {EDITED}")
    missing = [f"{s}.{key}" for s, keys in REQUIRED_KEYS.items() for key in keys if key not in group.attrs[s]]
    if missing:
        raise FptError(f"{path}: the store's attributes lack {', '.join(missing)}; {EDITED}")
    try:
        geometry = Geometry(**group.attrs["geometry"])
    except TypeError as e:
        raise FptError(f"{path}: the store's geometry is not one fpt writes ({e}); {EDITED}") from None
    classes = group.attrs["dataset"].get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise FptError(f"{path}: the store names the classes {classes!r}, not two or more; {EDITED}")
    return geometry


def check_structure(path: StoreLocation, group: zarr.Group) -> Geometry:
    """``check_attributes``, and every array there, of the geometry's shape."""
    geometry = check_attributes(path, group)
    for name, (shape, _) in geometry.sample_shapes().items():
        try:
            array = group[name]
        except KeyError:
            raise FptError(f"{path}: the array {name!r} is missing; {EDITED}") from None
        if array.shape != (geometry.n_samples, *shape):
            raise FptError(f"{path}: {name!r} has the shape {array.shape}, the store's geometry says "
                           f"{(geometry.n_samples, *shape)}; {EDITED}")
    return geometry


class StoreReader:
    """Read-only access to one store.

    >>> r = StoreReader("demo.zarr")
    >>> idx = r.split_indices("train")
    >>> batch = r.read(idx[:16])          # dict: keys/values [16, L, H, k, d], images [16, R, R, C], labels [16]
    """

    def __init__(self, path: str | Path | StoreLocation):
        self.path = StoreLocation(path)
        self.group = open_group(self.path)
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        self.geometry = check_structure(self.path, self.group)
        self.excluded = np.zeros(0, dtype=np.int64)      # samples left out of every split (see ``exclude``)
        self._rows: dict[str, tuple[tuple[int, ...], np.dtype]] = {}     # ``row_layout``'s, by array

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["dataset"]["classes"])

    @cached_property
    def labels(self) -> np.ndarray:
        labels = self._whole("labels").astype(np.int64)
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.classes):
            raise FptError(f"{self.path}: labels run from {labels.min()} to {labels.max()}, but the store names "
                           f"{len(self.classes)} classes; {EDITED}")
        return labels

    @cached_property
    def split(self) -> np.ndarray:
        return self._whole("split")

    @cached_property
    def ids(self) -> np.ndarray:
        return np.array(decode_ids(self._whole("ids")), dtype=object)

    def _whole(self, name: str) -> np.ndarray:
        """A small per-sample array, read whole: one that cannot be read (a chunk failing its checksum) leaves
        no sample to skip, so it is one error."""
        try:
            return self.group[name][:]
        except Exception as e:  # noqa: BLE001 - zarr's codecs raise their own (ValueError for a bad checksum)
            raise FptError(f"{self.path}: cannot read {name!r}, which every sample needs ({type(e).__name__}: {e}); "
                           "the store is damaged beyond --skip-corrupt: re-extract it (fpt extract ... "
                           "--overwrite)") from None

    def done(self) -> np.ndarray:
        """Which samples are finished; flags that cannot be read (a corrupt chunk) are one error with the fix:
        ``fpt store verify --repair`` marks their shards for re-extraction."""
        try:
            return self.group[DONE][:]
        except Exception as e:  # noqa: BLE001 - zarr's codecs raise their own (ValueError for a bad checksum)
            raise FptError(f"{self.path}: cannot read {DONE!r} ({type(e).__name__}: {e}); `fpt store verify "
                           f"{self.path} --repair` marks the damaged shards for re-extraction, then re-run the same "
                           "`fpt extract` command") from None

    def require_complete(self) -> None:
        missing = int((~self.done()).sum())
        if missing:
            raise FptError(f"{self.path}: {missing} of {self.geometry.n_samples} samples are not extracted yet; "
                           "re-run the same `fpt extract` command to finish the store")

    def exclude(self, indices) -> None:
        """Leave ``indices`` out of every ``split_indices`` from now on (e.g. samples found corrupt)."""
        self.excluded = np.union1d(self.excluded, np.asarray(indices, dtype=np.int64))

    def split_indices(self, split: str) -> np.ndarray:
        idx = np.setdiff1d(np.flatnonzero(self.split == SPLITS.index(split)), self.excluded)
        if len(idx) == 0:
            left_out = np.intersect1d(np.flatnonzero(self.split == SPLITS.index(split)), self.excluded)
            raise FptError(f"{self.path}: the {split} split is empty"
                           + (f" once its {len(left_out)} corrupt samples are left out (--skip-corrupt)"
                              if len(left_out) else ""))
        return idx

    def read(self, idx: Iterable[int], names: Iterable[str] = ("keys", "values", "images"),
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Arrays for the samples ``idx`` (any order; returned in that order) plus their ``labels``.

        Rows are sorted and read as slices that decompress each chunk once (zarr's integer indexing costs ~30x
        more per sample): one slice per run of rows that are consecutive or share a chunk, the rows between
        those of one chunk read with them and dropped (a chunk is decompressed whole anyway). What is already in
        place is not copied again: a slice of consecutive rows as read, one slice without a concatenation,
        sorted ``idx`` without reordering (a streamed window: whole shards in store order).

        ``out``: where to put some of them (name -> array of ``row_layout``'s shape and dtype with ``len(idx)``
        rows in front), returned as given. With sorted ``idx``, consecutive rows are decompressed straight into
        it: a streamed window lands where its reader sends it from (``fpt.loader_slots``), with no copy.
        """
        idx = np.asarray(idx, dtype=np.int64)
        in_order = bool(np.all(idx[1:] >= idx[:-1]))
        sorted_idx, inverse = idx, None
        if not in_order:
            order = np.argsort(idx, kind="stable")
            sorted_idx, inverse = idx[order], np.empty_like(order)
            inverse[order] = np.arange(len(order))
        names, out = tuple(names), dict(out or {})
        if not set(out) <= {*names, "labels"}:
            raise ValueError(f"out names {sorted(set(out) - {*names, 'labels'})}, which are not read")
        layout = self.row_layout(names) if out else {}
        for name, target in out.items():
            shape, dtype = layout[name]
            if target.shape != (len(idx), *shape) or target.dtype != dtype or not target.flags.c_contiguous:
                raise ValueError(f"out[{name!r}] is {target.dtype} {target.shape}, not C-contiguous "
                                 f"{dtype} {(len(idx), *shape)}")
        result: dict[str, np.ndarray] = {}
        for name in names:
            array, target = self.group[name], out.get(name)
            try:
                spans = chunk_spans(sorted_idx, array.chunks[0])
                if target is not None and inverse is None:
                    _rows_into(array, spans, target)
                    result[name] = target
                    continue
                pieces = [_rows(array, span) for span in spans]
            except Exception as e:
                raise FptError(f"{self.path}: cannot read {name!r} for samples "
                               f"{list(self.ids[sorted_idx][:5])}... ({type(e).__name__}: {e})") from None
            data = (np.zeros((0, *array.shape[1:]), dtype=array.dtype) if not pieces else
                    pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
            data = data if inverse is None else data[inverse]
            if target is not None:
                target[...] = data
            result[name] = data if target is None else target
        result["labels"] = self.labels[idx] if "labels" not in out else np.take(self.labels, idx, out=out["labels"])
        return result

    def row_layout(self, names: Iterable[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each of ``names``' (and ``labels``') shape and dtype per sample, as ``read`` returns them (looked up
        once per array: a store's metadata may be a request away)."""
        names = tuple(names)
        for name in names:
            if name not in self._rows:
                array = self.group[name]
                self._rows[name] = (tuple(array.shape[1:]), np.dtype(array.dtype))
        return {**{name: self._rows[name] for name in names}, "labels": ((), self.labels.dtype)}


def _rows_into(array: zarr.Array, spans: list[np.ndarray], target: np.ndarray) -> None:
    """``_rows`` of each span, one after another in ``target`` (C-contiguous): a slice of consecutive rows
    decompressed straight into its place."""
    start = 0
    for span in spans:
        rows = target[start:start + len(span)]
        if np.all(np.diff(span) == 1):
            array.get_basic_selection(slice(span[0], span[-1] + 1), out=NDBuffer.from_numpy_array(rows))
        else:
            rows[...] = _rows(array, span)
        start += len(span)


def _rows(array: zarr.Array, span: np.ndarray) -> np.ndarray:
    """The rows ``span`` (sorted) of ``array``: one slice from the first to the last, less the rows between."""
    block = array[span[0]:span[-1] + 1]
    return block if np.all(np.diff(span) == 1) else block[span - span[0]]


def chunk_spans(rows: np.ndarray, chunk_rows: int) -> list[np.ndarray]:
    """Sorted ``rows`` cut into spans that each slice reads once: a new span starts where a row is neither the
    next one nor in the previous row's chunk (of ``chunk_rows`` rows)."""
    if not len(rows):
        return []
    gaps = np.diff(rows)
    same_chunk = rows[1:] // chunk_rows == rows[:-1] // chunk_rows
    return np.split(rows, np.flatnonzero((gaps != 1) & ~same_chunk) + 1)


def as_dask(path: str | Path | StoreLocation) -> dict[str, "dask.array.Array"]:
    """Every array of the store as a lazy dask array, chunked by shard (one task per shard file).

    >>> arrays = as_dask("cmmd.zarr")
    >>> arrays["keys"]                      # dask.array<[S, L, H, k, d], float16>
    >>> arrays["keys"][arrays["split"] == 0].mean(axis=(0, 3)).compute()   # mean train key per layer/head/dim
    """
    group = open_group(path)
    return {name: _dask_array(group[name]) for name in ARRAY_NAMES}


def _dask_array(arr: zarr.Array):
    import dask.array as da

    return da.from_zarr(arr, chunks=arr.shards or arr.chunks)


def _codec_name(codec: dict[str, Any]) -> str:
    """A codec of zarr.json as ``fpt inspect`` shows it; Blosc with its settings (``blosc(zstd-1,shuffle,512k)``)."""
    if codec.get("name") != "blosc":
        return codec.get("name")
    c = codec.get("configuration", {})
    blocks = f"{c['blocksize'] >> 10}k" if c.get("blocksize") else "auto"
    return f"blosc({c.get('cname')}-{c.get('clevel')},{c.get('shuffle')},{blocks})"


def _describe(path: StoreLocation, name: str, arr: zarr.Array) -> dict[str, Any]:
    """One array's row of ``summarize``. ``codecs``: each chunk's codecs with their settings, inside the shard
    file for a sharded array (``shards`` not None); ``codec_names``: the same without settings."""
    codecs = arr.metadata.to_dict()["codecs"]
    if [c.get("name") for c in codecs] == ["sharding_indexed"]:
        codecs = codecs[0]["configuration"]["codecs"]
    return {"name": name, "shape": tuple(arr.shape), "dtype": str(arr.dtype), "chunks": tuple(arr.chunks),
            "shards": tuple(arr.shards) if arr.shards else None, "codecs": [_codec_name(c) for c in codecs],
            "codec_names": [c.get("name") for c in codecs],
            "raw_bytes": int(np.prod(arr.shape)) * arr.dtype.itemsize,
            "disk_bytes": path.size(name)}


def summarize(path: str | Path | StoreLocation) -> dict[str, Any]:
    """What ``fpt inspect`` shows, computed with dask so it works on stores larger than memory.

    Arrays whose metadata cannot be read are listed under ``unreadable`` instead of failing the summary.
    """
    import dask

    path = StoreLocation(path)
    group = open_group(path)
    n_samples = check_attributes(path, group).n_samples        # the arrays may be damaged: they are listed
    attrs = dict(group.attrs)
    classes = attrs["dataset"]["classes"]
    table, unreadable, lazy = [], {}, {}
    for name in ARRAY_NAMES:
        try:
            arr = group[name]
            table.append(_describe(path, name, arr))
            lazy[name] = _dask_array(arr)
        except Exception as e:
            unreadable[name] = f"{type(e).__name__}: {e}"
    counts, done = None, None
    try:
        split, labels = lazy["split"], lazy["labels"]
        masks = [[((split == s) & (labels == c)).sum() for c in range(len(classes))] for s in range(len(SPLITS))]
        sums, done = dask.compute(masks, lazy[DONE].sum())
        counts = {SPLITS[s]: {classes[c]: int(sums[s][c]) for c in range(len(classes))} for s in range(len(SPLITS))}
        done = int(done)
    except Exception as e:
        unreadable.setdefault("labels/split/done", f"{type(e).__name__}: {e}")
    return {"path": str(path), "attrs": attrs, "counts": counts, "done": done, "n_samples": n_samples,
            "arrays": table, "unreadable": unreadable, "disk_bytes": path.size(),
            "raw_bytes": sum(a["raw_bytes"] for a in table)}
