"""The feature store: the only code that knows the on-disk layout (see layout.py for the schema).

Public API:
    StoreLocation          where a store lives: a local path or an fsspec URL (s3://, gs://, memory://, ...)
    store_stem(path)       the store name without .zarr (for default output names)
    StoreWriter            create / resume a store, write whole shards (local shard files past the page cache:
                           direct_io.py)
    SharedArrays, open_shared   arrays handed to other processes through one memory-mapped file
    HandoverSlots, SharedSlot, handover_spec   reusable hand-over files for a stream of shards to writer
                           processes, filled by copying or in place (handover_spec: where each array goes)
    WorkerSlots            reusable memory that helper processes fill and this process reads (DataLoader items)
    write_shared_shard     whole-shard writes in a writer process (shared.py says why); start_writer, its
                           initializer; start_helper, a DataLoader worker's (lower_priority: its CPU priority
                           lowered; reuse_freed_memory: its malloc set to reuse big buffers)
    check_same_extraction  refuse a store holding another extraction, before the expensive part
    check_replaceable      refuse, before the expensive part, what --overwrite would not replace
    StoreLock              one extraction at a time per store (<store>.lock: flock, or a lease on object stores)
    StoreReader            read samples and metadata for training
    as_dask(path)          every array as a lazy dask array (for notebooks and big stores)
    summarize(path)        the facts ``fpt inspect`` shows
    verify(path)           which samples are unfinished, missing or fail their checksums (VerifyReport)
    mark_for_reextraction  the repair path: damaged samples' shards back to not done, for `fpt extract` to rewrite
    Geometry, SCHEMA_VERSION, SPLITS, SAMPLE_ARRAYS, FEATURE_DTYPES, choose_samples_per_shard
    encode_ids             sample ids as the store holds them (UTF-8 bytes; a name that is not UTF-8 refused)
    CODECS, DEFAULT_CODEC  lossless chunk codecs for ``fpt extract --codec`` (measured in bench/codec.py)
"""
from fpt.store.layout import (CODECS, DEFAULT_CODEC, EXCLUDED_SPLIT, FEATURE_DTYPES, SAMPLE_ARRAYS, SCHEMA_VERSION,
                              SPLITS, Geometry, choose_samples_per_shard, encode_ids)
from fpt.store.location import StoreLocation, is_url, store_stem
from fpt.store.lock import StoreLock
from fpt.store.reader import StoreReader, as_dask, summarize
from fpt.store.verify import VerifyReport, mark_for_reextraction, verify
from fpt.store.shared import (HandoverSlots, SharedArrays, SharedSlot, Spec, lower_priority, open_shared, handover_spec,
                              reuse_freed_memory, start_helper, start_writer, write_shared_shard, WorkerSlots,
                              shm_has_room)
from fpt.store.writer import StoreWriter, check_replaceable, check_same_extraction

__all__ = ["CODECS", "DEFAULT_CODEC", "EXCLUDED_SPLIT", "FEATURE_DTYPES", "SAMPLE_ARRAYS", "SCHEMA_VERSION", "SPLITS",
           "Geometry",
           "choose_samples_per_shard", "encode_ids", "StoreLocation", "StoreLock", "StoreReader", "StoreWriter",
           "as_dask", "check_replaceable", "check_same_extraction", "is_url", "store_stem", "summarize", "verify",
           "VerifyReport", "mark_for_reextraction", "HandoverSlots", "SharedArrays", "SharedSlot", "Spec",
           "lower_priority", "open_shared", "handover_spec", "reuse_freed_memory", "start_helper", "start_writer",
           "write_shared_shard", "WorkerSlots", "shm_has_room"]
