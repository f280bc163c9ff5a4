"""``fpt extract``: samples -> frozen LPM -> top-k K/V -> store, one whole shard at a time.

Shards are extracted in this process (``extract_shards``) or as dask.distributed tasks, one task per shard, each
worker keeping its own LPM (``scheduler="local:N"`` or a scheduler address). Either way a shard is written whole
and marked done last, so an interrupted run resumes where it stopped and gives the same store.
"""
from __future__ import annotations

import errno
import os
import time
import warnings
import weakref
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import groupby
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fpt import FptError, helper_process_died
from fpt.cluster import check_scheduler, dask_client, worker_device
from fpt.config import (HOST_PROCESSES_MAX, ExtractConfig, check_image_res_fits_patch, helper_niceness, resolve_device,
                        resolve_precision)
from fpt.extract.backbone import BackboneInfo, FrozenLPM, create_backbone
from fpt.extract.datasets import open_source, resolve_normalization
from fpt.extract.encode import encode_batch, pixel_dtype, stack_batch, stack_pixels
from fpt.extract.images import low_res_copy, lpm_input
from fpt.extract.samples import ImageSource, SampleRef, check_class_coverage, unreadable_source_error
from fpt.extract.shard_writing import ShardBuffer, ShardWriterPool
from fpt.extract.timing import DeviceLead, LoopWaits, Progress, ShardClock
from fpt.loader_slots import PREFETCH, SlotItem, loader_slots, received, stack_in_slot
from fpt.store import (SPLITS, Geometry, StoreLocation, StoreLock, StoreReader, StoreWriter, WorkerSlots,
                       check_replaceable, check_same_extraction, choose_samples_per_shard, encode_ids, is_url,
                       start_helper)


@dataclass
class ExtractResult:
    path: str
    n_samples: int
    n_written: int          # samples extracted by this run (0 when the store was already complete)
    seconds: float
    images_per_s: float
    peak_memory_mb: float
    n_skipped: int = 0                  # unreadable sources skipped by this run (--on-error skip)
    skipped_report: str | None = None   # where their paths and errors are listed
    # from the first finished shard to the last: without the start (workers, first batches, compiling); None
    # with fewer than 3 shards written
    steady_images_per_s: float | None = None
    # the start, taken apart: from the start to the loop's first decoded batch (decode workers starting, the first
    # batch's decoding), to the end of the first shard's copies from the device (+ the LPM's first steps) and to
    # the first written shard (+ its write); None where there was none (or on dask, for the first two). The end:
    # to the last written shard (the rest of ``seconds`` is stopping the workers and writers)
    first_batch_seconds: float | None = None
    first_copied_seconds: float | None = None
    first_shard_seconds: float | None = None
    last_shard_seconds: float | None = None
    # seconds the loop waited for decoded batches, for the device (to catch up with the batches issued, or to finish
    # a shard's copies) and for shard writers (``LoopWaits``; None on dask)
    waited_for_decoding_s: float | None = None
    waited_for_device_s: float | None = None
    waited_for_writers_s: float | None = None
    # the LPM's first step on zeros while the decode workers start (``warm_up``: CUDA with workers; else None)
    warm_up_seconds: float | None = None
    # when each stage of the start and of the end was over, from the start (``LoopWaits.mark``): the decode workers
    # forked, the writer pool started, the loop done, the shards written, the writer processes stopped, the writers
    # done (hand-over files closed); empty on dask
    moments_seconds: dict[str, float] = field(default_factory=dict)

    def limit(self) -> tuple[str, float] | None:
        """What limited the run most, with its share of the run: ``decoding`` or ``writing`` (the loop waited for
        that stage) or ``model`` (the rest: issuing the LPM's work and waiting for the device's results);
        None without the figures."""
        if self.waited_for_decoding_s is None or self.waited_for_writers_s is None or self.seconds <= 0:
            return None
        shares = {"decoding": self.waited_for_decoding_s / self.seconds,
                  "writing": self.waited_for_writers_s / self.seconds}
        shares["model"] = 1 - sum(shares.values())
        stage = max(shares, key=shares.get)
        return stage, shares[stage]


def default_layers(depth: int) -> list[int]:
    """The last half of the LPM (6-11 for a 12-layer ViT-B), as in the paper."""
    return list(range(depth // 2, depth))


# One LPM and one source listing per process, reused by every shard task that lands on it.
_LPM: dict[tuple, tuple[FrozenLPM, BackboneInfo]] = {}     # one LPM, under its given and its resolved layers
_SOURCES: dict[tuple, ImageSource] = {}


def load_lpm(cfg: ExtractConfig, device: torch.device) -> tuple[FrozenLPM, BackboneInfo]:
    """The frozen LPM ``cfg`` describes, on ``device``: built once per process (another one replaces it)."""
    def key(layers) -> tuple:
        return (cfg.backbone, cfg.res, str(cfg.weights), cfg.random_init, tuple(layers or ()), cfg.token_ratio,
                cfg.importance, cfg.query_block, str(device))

    if key(cfg.layers) not in _LPM:
        _LPM.clear()
        model, info = create_backbone(cfg.backbone, cfg.res, cfg.weights, cfg.random_init, cfg.layers)
        layers = cfg.layers or default_layers(info.depth)
        entry = (FrozenLPM(model, layers, cfg.token_ratio, cfg.importance, cfg.query_block).to(device), info)
        # found again under the resolved layers too: extract() passes them on to the shard loop
        _LPM[key(cfg.layers)] = _LPM[key(layers)] = entry
    return _LPM[key(cfg.layers)]


def load_source(cfg: ExtractConfig) -> ImageSource:
    key = (cfg.source, str(cfg.data), cfg.res, cfg.seed, tuple(cfg.classes or ()), cfg.j2k_decode)
    if key not in _SOURCES:
        _SOURCES[key] = open_source(cfg)
    return _SOURCES[key]


def extract(cfg: ExtractConfig, progress: Progress | None = None, scheduler: str | None = None,
            warn: Callable[[str], None] | None = None) -> ExtractResult:
    """Run the frozen LPM over every sample not yet in the store at ``cfg.out`` and write its shards.

    ``progress(done, total)`` is called as samples finish; ``warn(message)`` gets each dataset problem worth a
    loud warning (a class missing from val or test; default: ``warnings.warn``), also recorded in the store's
    ``dataset.warnings``. Everything that can be checked without the LPM (classes, an existing store of another
    extraction) is checked before the LPM is loaded. Re-running on a complete store does nothing; a store whose
    shards ``fpt store verify --repair`` marked gets exactly those shards rewritten; a concurrent extraction of
    the same store is refused (``StoreLock``).
    """
    device = resolve_device(cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))     # one precision for every worker
    if scheduler is not None:
        check_scheduler(scheduler)                                              # a bad one, before any work
    with StoreLock(cfg.out):
        source = load_source(cfg)
        samples = source.samples
        ids = np.array([s.id for s in samples], dtype=object)
        id_bytes = encode_ids(ids).shape[1]                        # refuses a file name that is not UTF-8
        dataset_warnings = check_class_coverage(samples, source.classes, str(cfg.data or cfg.source))
        if not cfg.overwrite:
            check_same_extraction(cfg.out, settings_attrs(cfg, source, dataset_warnings), ids)
        else:
            check_replaceable(cfg.out)
        for message in dataset_warnings:
            (warn or _warn)(message)
        cfg = resolve_normalization(cfg, source)                   # --mean/--std auto: train-split statistics
        lpm, info = load_lpm(cfg, device if scheduler is None else torch.device("cpu"))
        check_image_res_fits_patch(cfg.image_res, info.patch_size, cfg.backbone)    # a name without its patch
        cfg = replace(cfg, layers=lpm.layers)
        k = lpm.n_selected(cfg.res)
        geometry = Geometry(n_samples=len(samples), layers=len(lpm.layers), heads=info.heads, k=k,
                            head_dim=info.head_dim, embed_dim=info.embed_dim, image_res=cfg.image_res,
                            id_bytes=id_bytes)
        geometry = replace(geometry, samples_per_shard=cfg.samples_per_shard
                           or choose_samples_per_shard(geometry.bytes_per_sample()))
        writer = StoreWriter.open(
            cfg.out, geometry, store_attrs(cfg, source, info.as_attrs(), lpm.layers, k, dataset_warnings), ids=ids,
            labels=np.array([s.label for s in samples]), split=np.array([s.split for s in samples]),
            overwrite=cfg.overwrite, codec=cfg.codec, direct_io=cfg.direct_io)
        with writer.replacing():            # --overwrite: the store it replaces goes once this one is complete
            pending = writer.pending_shards()
            host = host_defaults(cfg, device)         # what the loop runs with (here, or in each dask worker)
            writers = writers_kind(cfg, device) if scheduler is None else "threads"
            # shards waiting for their writer + those being filled (per process on dask); with writer processes they
            # are filled in their hand-over files (unless the driver refuses to page-lock those: see ShardWriterPool)
            g = writer.geometry
            buffers = host.write_threads + shards_filling(host.batch_size, g.samples_per_shard)
            host_buffer_mb = buffers * g.samples_per_shard * g.bytes_per_sample() / 2**20
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, clock, waits = time.perf_counter(), ShardClock(), LoopWaits()
            with _loop_errors_as_fpt(cfg.out, len(samples)):
                if scheduler is None:
                    written, skipped = extract_shards(cfg, pending, progress, waits, clock)
                else:
                    written, skipped = extract_on_dask(cfg, pending, scheduler, progress, clock)
            result = _result(cfg, len(samples), written, skipped, start, clock, waits if scheduler is None else None,
                             device)
            if skipped:
                result.skipped_report = str(writer.record_skipped(sorted(skipped)))
            if written:
                ran = host if scheduler is None else cfg       # on dask each worker chooses for its own device
                writer.update_attrs(last_run={
                    **_last_run(result), "device": str(device), "scheduler": scheduler,
                    "batch_size": ran.batch_size, "workers": ran.workers, "write_threads": ran.write_threads,
                    "writers": writers,
                    "precision": cfg.precision, "direct_io": cfg.direct_io,
                    "host_buffer_limit_mb": round(host_buffer_mb, 1),
                    "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS"})
            return result


@contextmanager
def _loop_errors_as_fpt(out: str, n_samples: int) -> Iterator[None]:
    """The extraction loop's failures a user can act on, as one FptError that says how to resume: a full disk,
    an object store's refusal, a decode worker that died. The finished shards are kept in every case."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            done = int(StoreReader(out).done().sum())
            raise FptError(f"no space left on the device of {out} ({done} of {n_samples} samples are safely "
                           "written); free some space and re-run the same command to resume") from None
        if is_url(out):       # object-store errors (denied, throttled, gone) arrive as OSError
            raise FptError(f"writing to {out} failed ({type(e).__name__}: {e}); the finished shards are kept: "
                           "re-run the same command to resume") from None
        raise
    except RuntimeError as e:
        if not helper_process_died(e):
            raise
        raise FptError(f"a decode worker died ({e}); the finished shards are kept: re-run the same command to "
                       "resume (with fewer --workers if the host ran out of memory)") from None


def _result(cfg: ExtractConfig, n_samples: int, written: int, skipped: list, start: float, clock: ShardClock,
            waits: LoopWaits | None, device: torch.device) -> ExtractResult:
    """The run's result, its moments from ``start``; ``waits``: the loop's in this process (None on dask)."""
    seconds = time.perf_counter() - start
    loop = {} if waits is None else {
        "first_batch_seconds": None if waits.first_batch is None else waits.first_batch - start,
        "warm_up_seconds": waits.warm_up, "moments_seconds": {name: t - start for name, t in waits.moments.items()},
        "waited_for_decoding_s": waits.decoding, "waited_for_device_s": waits.device,
        "waited_for_writers_s": waits.writing}
    return ExtractResult(str(cfg.out), n_samples, written, seconds,
                         written / seconds if written and seconds > 0 else 0.0, peak_memory_mb(device),
                         n_skipped=len(skipped), steady_images_per_s=clock.steady_images_per_s(),
                         first_shard_seconds=clock.first_shard_seconds(start),
                         last_shard_seconds=clock.last_shard_seconds(start),
                         first_copied_seconds=clock.first_copied_seconds(start), **loop)


def _last_run(result: ExtractResult) -> dict[str, Any]:
    """The store's ``last_run`` figures of ``result``, rounded."""
    def rounded(v: float | None) -> float | None:
        return v and round(v, 3)                # None and 0 stay as they are

    return {"images_per_s": round(result.images_per_s, 3), "seconds": round(result.seconds, 3),
            "samples": result.n_written, "steady_images_per_s": rounded(result.steady_images_per_s),
            "waited_for_decoding_s": rounded(result.waited_for_decoding_s),
            "waited_for_device_s": rounded(result.waited_for_device_s),
            "waited_for_writers_s": rounded(result.waited_for_writers_s),
            "limited_by": (result.limit() or (None,))[0], "peak_memory_mb": round(result.peak_memory_mb, 1),
            "skipped": result.n_skipped}


class DecodedImages(Dataset):
    """Item i -> the LPM's input high [res, res, C] in [0, 255] (``lpm_input``), or the error message of an
    unreadable source, so that a bad file in a DataLoader worker reaches the user as one clear line. ``high`` stays
    as the source has it until the LPM's device: channels last as decoded (the device transposes for free what cost
    a worker ~1 ms per 512 px RGB image), one channel for grey (C = 1), uint8 for 8-bit (a sixth of an fp16 RGB
    copy's bytes for 8-bit grey through the workers' shared memory, pinning and the copy to the GPU, and no
    conversion in the worker); a float (16-bit) source's is ``high_dtype``. The low-res copy is made from it on
    the device too (``low_res_copy``)."""

    def __init__(self, source: ImageSource, refs: list[SampleRef], res: int, on_error: str,
                 high_dtype: torch.dtype = torch.float32, slots: WorkerSlots | None = None):
        self.source, self.refs, self.res, self.on_error = source, refs, res, on_error
        self.high_dtype = high_dtype
        self.slots = slots                  # decode workers stack their batches there (``fpt.loader_slots``)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        try:
            high = torch.from_numpy(lpm_input(self.source.load(self.refs[i]), self.res))
        except FptError as e:
            return str(e)
        return high if high.dtype == torch.uint8 else high.to(self.high_dtype)

    def collate(self, items) -> tuple[torch.Tensor | SlotItem, dict[int, str]]:
        """-> (high [B, res, res, C] (``stack_pixels``; in a decode worker with slots, a ``SlotItem`` that
        ``received`` makes the tensor), {position in batch: error}); unreadable items are zeros with
        ``on_error="skip"`` and raise with ``"fail"``."""
        errors = {i: item for i, item in enumerate(items) if isinstance(item, str)}
        if errors and self.on_error != "skip":
            raise unreadable_source_error(next(iter(errors.values())))
        blank = torch.zeros(self.res, self.res, 1, dtype=torch.uint8)
        highs = [blank if i in errors else item for i, item in enumerate(items)]
        return stack_pixels(highs, self.high_dtype, partial(stack_in_slot, self.slots, stack_batch)), errors


def extract_shards(cfg: ExtractConfig, shards: list[int], progress: Progress | None = None,
                   waits: LoopWaits | None = None, clock: ShardClock | None = None
                   ) -> tuple[int, list[tuple[int, str, str]]]:
    """Extract ``shards`` of the existing store at ``cfg.out`` and write each one whole. Runs in any process.
    Returns (samples written, [(index, id, error)] of the unreadable sources skipped).

    A pipeline, every stage overlapping the others: images are decoded in DataLoader workers (``cfg.workers``)
    and copied to the device from pinned memory; the LPM and the low-res copy run asynchronously on CUDA; their
    outputs are copied back into the shard's page-locked host buffers (``ShardBuffer``: with writer processes,
    the hand-over file the writer process reads); a finished shard is encoded and written by writer threads
    (``cfg.write_threads``, each handing it to a writer process on CUDA) while the next one is computed. At most
    ``write_threads`` shards wait for writing, so host memory stays below (write_threads + ``shards_filling``) x
    the shard size. A batch that does not fit on the GPU is split in halves until it does. ``waits`` (a
    ``LoopWaits``) gets where the loop waited, ``clock`` (a ``ShardClock``) when each shard was copied and
    written. On CUDA the decode workers and writer processes run at a lower CPU priority than this process
    (``helper_niceness``).
    """
    waits = waits or LoopWaits()
    device = resolve_device(cfg.device)
    cfg = host_defaults(cfg, device)
    lpm, _ = load_lpm(cfg, device)
    source = load_source(cfg)
    writer = StoreWriter.reopen(cfg.out, cfg.direct_io)
    geometry = writer.geometry
    batch_size, workers = cfg.batch_size, cfg.workers
    batches = shard_batches(geometry, shards, batch_size)
    refs = [source.samples[i] for batch in batches for part in batch for i in part.indices]
    offsets = np.cumsum([0] + [sum(len(part.indices) for part in b) for b in batches])
    total, skipped = len(refs), []
    niceness = helper_niceness(device)          # the decode workers' and writer processes' lower CPU priority
    # the device current while the loop runs: its streams are the ones the copies and events follow (cuda:1 too)
    with (torch.cuda.device(device) if device.type == "cuda" else nullcontext(),
          intra_op_threads(1 if device.type == "cuda" else None),
          loader_slots(workers, decode_slot_bytes(batch_size, cfg.res), pinned=device.type == "cuda") as slots):
        images = DecodedImages(source, refs, cfg.res, cfg.on_error, pixel_dtype(cfg.precision, device), slots)
        loader = DataLoader(images, batch_sampler=[range(offsets[i], offsets[i + 1]) for i in range(len(batches))],
                            num_workers=workers, pin_memory=device.type == "cuda", collate_fn=images.collate,
                            prefetch_factor=PREFETCH if workers else None,
                            worker_init_fn=partial(start_helper, niceness=niceness))
        # the decode workers fork (and start on the first batches) before any writer process starts: a fork while
        # one starts would leave a dead fork server unnoticed (see ShardWriterPool)
        decoded = iter(loader)
        waits.mark("decode_workers_forked")
        with ShardWriterPool(writer, cfg.write_threads, progress, total,
                             writers_kind(cfg, device) == "processes", waits, pinned=device.type == "cuda",
                             clock=clock, shards=len(shards), niceness=niceness,
                             filling=shards_filling(batch_size, geometry.samples_per_shard)) as pool:
            waits.mark("writer_pool_started")
            filling: dict[int, ShardBuffer] = {}            # shards with rows still to come, in store order
            if warms_up(device, workers) and lpm not in _WARMED_UP:
                began = waits.now()
                warm_up(lpm, cfg, batch_size, device)
                waits.warm_up = waits.now() - began
            lead = DeviceLead(waits, (lambda: torch.cuda.Event(blocking=True)) if device.type == "cuda" else None)
            for batch, (high, errors) in zip(batches, waits.batches(decoded)):
                high = received(high).to(device, non_blocking=True)                 # [B, res, res, C]
                out = {**encode_batch(lpm, high, cfg.mean, cfg.std, cfg.precision),
                       "images": low_res_copy(high, cfg.image_res)}
                add_to_shards(batch, out, errors, filling, pool, source.samples, skipped)
                lead.issued()
            # the iterator's end stops the decode workers: now, while the last shards are written, rather than when
            # it is dropped after them (16 workers: 0.1-0.2 s more at the end of a run on the dev box)
            next(decoded, None)
            waits.mark("loop_done")
        waits.mark("writers_done")
    return pool.written, skipped


def add_to_shards(batch: list[BatchPart], out: dict[str, torch.Tensor], errors: dict[int, str],
                  filling: dict[int, ShardBuffer], pool: ShardWriterPool, samples: list[SampleRef],
                  skipped: list[tuple[int, str, str]]) -> None:
    """One batch's outputs (``out``: [b, ...] each) into the shards it covers (``filling``: by shard, those with
    rows still to come); a shard whose last rows these are goes to the writers. The rows of unreadable sources
    (``errors``: position in the batch -> message) are excluded from their shard and listed in ``skipped``."""
    start = 0
    for part in batch:
        if part.shard not in filling:
            filling[part.shard] = pool.buffer(part.shard)
        shard, end = filling[part.shard], start + len(part.indices)
        for pos, message in errors.items():
            if start <= pos < end:
                index = part.indices[pos - start]
                skipped.append((index, samples[index].id, message))
                shard.excluded.append(index)
        shard.add(part.indices, {name: t[start:end] for name, t in out.items()})
        if part.last_of_shard:
            pool.submit(filling.pop(part.shard))
        start = end


def decode_slot_bytes(batch_size: int, res: int) -> int:
    """A decode worker's slot (``fpt.loader_slots``): a batch of 8-bit RGB images (grey, and 16-bit grey in half
    precision, fit too; a bigger batch goes the DataLoader's way)."""
    return batch_size * res * res * 3


def warms_up(device: torch.device, workers: int) -> bool:
    """Whether the loop runs the LPM once on zeros while the decode workers decode the first batch: on CUDA,
    where a fresh process's first step loads kernels and libraries (ViT-B: 0.95-1.02 s on an H200, lease 4),
    with workers to decode meanwhile; not on a CPU, where that step is a whole batch of work and cheap to start."""
    return device.type == "cuda" and workers > 0


@torch.no_grad()
def warm_up(lpm: FrozenLPM, cfg: ExtractConfig, batch_size: int, device: torch.device) -> None:
    """The LPM's first step (and the low-res copy's) on a batch of zeros of the run's shape; its output is
    dropped. ``warms_up`` says when; once per LPM (a dask worker keeps its LPM from one shard task to the next)."""
    zeros = torch.zeros(batch_size, cfg.res, cfg.res, 3, dtype=torch.uint8, device=device)
    encode_batch(lpm, zeros, cfg.mean, cfg.std, cfg.precision)
    low_res_copy(zeros, cfg.image_res)
    _WARMED_UP.add(lpm)


_WARMED_UP: weakref.WeakSet = weakref.WeakSet()      # the LPMs of this process that ran ``warm_up``


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads for this thread's CPU ops set to ``n`` inside the block (None: left alone), and
    restored after it.

    Extraction's main thread on CUDA does no CPU compute worth a team (its one CPU op per batch, copying the
    low-res images into the shard buffer, moved to the device with ``low_res_copy``). Any CPU op of more than
    ~32 K elements would run on torch's OpenMP team, and every such region leaves the team's other threads
    spinning afterwards (libgomp waits ~5 ms for more work; dev box: 5.0 ms of CPU per 0.8 MB copy with 2 threads
    against 0.15 with 1), on the cores the decode workers and writer processes need; one thread rules that out.
    torch.set_num_threads sets the calling thread's team, and the default of threads that start using torch
    inside the block (the DataLoader's pinning thread sets one for itself anyway; the writer threads run no torch
    CPU ops)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


@dataclass
class BatchPart:
    """The rows of one batch that belong to one shard."""
    shard: int
    indices: list[int]          # global sample indices, inside ``shard``, in order
    last_of_shard: bool         # the shard's last rows: it is whole after them


def shard_batches(geometry: Geometry, shards: list[int], batch_size: int) -> list[list[BatchPart]]:
    """The batches that cover ``shards`` in order, ``batch_size`` samples each (the last one may be smaller),
    each as its parts in one shard: a batch runs on across the end of a shard, so the LPM runs at the batch size
    asked for whatever the shard size (ViT-B at 1024: 4 samples per shard)."""
    rows = [(shard, i) for shard in shards for i in geometry.shard_range(shard)]
    batches = []
    for start in range(0, len(rows), batch_size):
        parts = []
        for shard, group in groupby(rows[start:start + batch_size], key=lambda row: row[0]):
            indices = [i for _, i in group]
            parts.append(BatchPart(shard, indices, indices[-1] == geometry.shard_range(shard).stop - 1))
        batches.append(parts)
    return batches


def host_defaults(cfg: ExtractConfig, device: torch.device) -> ExtractConfig:
    """``cfg`` with the batch size, decode workers and write threads not given chosen for ``device``."""
    return replace(cfg, batch_size=cfg.batch_size or default_batch_size(device),
                   workers=cfg.workers if cfg.workers is not None else default_workers(device),
                   write_threads=cfg.write_threads or default_write_threads(device))


def default_batch_size(device: torch.device) -> int:
    """Images per LPM step unless ``--batch-size`` says: 32 on CUDA (halved while it does not fit), 4 on a CPU."""
    return 32 if device.type == "cuda" else 4


def shards_filling(batch_size: int, samples_per_shard: int) -> int:
    """At most how many shards are being filled at once: those one batch covers, (b - 1) // s + 2 for a batch of
    b samples and shards of s (a batch may start anywhere in a shard)."""
    return (batch_size - 1) // samples_per_shard + 2


def writers_kind(cfg: ExtractConfig, device: torch.device) -> str:
    """``cfg.writers`` resolved: writer processes on CUDA (the GPU outruns one process's zarr event loop, see
    ``fpt.store.shared``), threads on a CPU (the LPM needs the cores there)."""
    if not StoreLocation(cfg.out).shared_between_processes:      # memory://: a writer process would write
        return "threads"                                         # into a filesystem of its own
    if cfg.writers != "auto":
        return cfg.writers
    return "processes" if device.type == "cuda" else "threads"


def default_workers(device: torch.device) -> int:
    """Decode workers: on CUDA one per core (up to HOST_PROCESSES_MAX), see ``default_write_threads``; none on a
    CPU, where the LPM needs the cores."""
    return min(HOST_PROCESSES_MAX, os.cpu_count() or 1) if device.type == "cuda" else 0


def default_write_threads(device: torch.device) -> int:
    """Shards encoded and written at once: on CUDA one writer per core (2 to HOST_PROCESSES_MAX) beside one
    decode worker per core. How the host's CPU divides between the two depends on the resolution and the source
    (ViT-B/512 from PNGs: writing ~13 ms and decoding ~7 ms of CPU per image, ``fpt.bench.host_cost``; a JPEG
    2000 mammogram: decoding ~1.7 s), so a fixed split leaves one side idle while the other is the limit (8
    writers on 16 cores cap that 512 run at 8 / 13 ms, about 600 images/s, on the dev box's cores). With as many
    of each as cores the kernel divides the cores by demand; a side's idle processes cost only their memory.
    On a CPU one, since the LPM needs the cores."""
    return max(2, min(HOST_PROCESSES_MAX, os.cpu_count() or 2)) if device.type == "cuda" else 1


def _shard_task(cfg: ExtractConfig, shard: int, threads: int | None) -> tuple[int, list]:
    if threads:
        torch.set_num_threads(threads)
    # a dask worker is a process of its own (and a daemon, which may not start writer processes)
    return extract_shards(replace(cfg, device=worker_device(cfg.device), writers="threads"), [shard])


def extract_on_dask(cfg: ExtractConfig, shards: list[int], scheduler: str, progress: Progress | None,
                    clock: ShardClock | None = None) -> tuple[int, list[tuple[int, str, str]]]:
    """Extract ``shards`` as dask.distributed tasks, one per shard (workers never write the same file).

    scheduler: ``local``/``local:N`` starts a LocalCluster of worker processes here; anything else is a scheduler
    address. CUDA tasks ask for the worker resource ``GPU=1`` so they run only on workers started with it.
    """
    from distributed import as_completed

    cuda = resolve_device(cfg.device).type == "cuda"
    with dask_client(scheduler, cuda, tasks=len(shards)) as (client, threads):
        futures = [client.submit(_shard_task, cfg, shard, threads, pure=False,
                                 resources={"GPU": 1} if cuda else None) for shard in shards]
        geometry = StoreWriter.reopen(cfg.out).geometry
        total, written, skipped = sum(len(geometry.shard_range(s)) for s in shards), 0, []
        for future in as_completed(futures):
            try:
                n, shard_skipped = future.result()
                written, skipped = written + n, skipped + shard_skipped
                if clock:
                    clock.shard_written(n)
            except BaseException:
                client.cancel(futures)
                raise
            if progress:
                progress(written, total)
        return written, skipped


# how the stored low-res copy is made (``low_res_copy``); stores from before it was recorded used PIL's BOX resize
# (two 8-bit passes), which differs by a level here and there, so a resumed store never mixes the two
LOW_RES_METHOD = "area"


def store_attrs(cfg: ExtractConfig, source: ImageSource, backbone: dict, layers: list[int] | None, k: int | None,
                dataset_warnings: list[str] = ()) -> dict:
    """The store's identity and description (``None`` layers/k: not known yet, left out)."""
    counts = Counter((s.split, s.label) for s in source.samples)
    extraction = {"res": cfg.res, "layers": layers, "token_ratio": cfg.token_ratio, "k": k,
                  "importance": cfg.importance, "dtype": "float16", "image_res": cfg.image_res,
                  "precision": cfg.precision, "j2k_decode": cfg.j2k_decode, "low_res": LOW_RES_METHOD}
    return {
        "backbone": backbone,
        "extraction": {key: v for key, v in extraction.items() if v is not None},
        "dataset": {"name": cfg.name, "classes": source.classes, "source": str(cfg.data or cfg.source),
                    **getattr(source, "attrs", {}),
                    "counts": {split: {c: counts[(i, j)] for j, c in enumerate(source.classes)}
                               for i, split in enumerate(SPLITS)},
                    "warnings": list(dataset_warnings)},
        # before ``auto`` is resolved, only the given one of mean/std can be compared with a store
        "normalization": {k: list(v) for k, v in (("mean", cfg.mean), ("std", cfg.std)) if v != "auto"},
    }


def settings_attrs(cfg: ExtractConfig, source: ImageSource, dataset_warnings: list[str]) -> dict:
    """The part of ``store_attrs`` known before the LPM is loaded (and before ``auto`` normalisation runs)."""
    return store_attrs(cfg, source, {"name": cfg.backbone}, cfg.layers, None, dataset_warnings)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB
