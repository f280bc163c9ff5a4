"""The feature store: the only code that knows the on-disk layout (see layout.py for the schema).

Public API:
    StoreLocation          where a store lives: a local path or an fsspec URL (s3://, gs://, memory://, ...)
    store_stem(path)       the store name without .zarr (for default output names)
    StoreWriter            create / resume a store, write whole shards
    StoreLock              one extraction at a time per store (<store>.lock: flock, or a lease on object stores)
    StoreReader            read samples and metadata for training
    as_dask(path)          every array as a lazy dask array (for notebooks and big stores)
    summarize(path)        the facts ``fpt inspect`` shows
    verify(path)           which samples are missing or fail their checksums (VerifyReport)
    Geometry, SCHEMA_VERSION, SPLITS, SAMPLE_ARRAYS, FEATURE_DTYPES, choose_samples_per_shard
    CODECS, DEFAULT_CODEC  lossless chunk codecs for ``fpt extract --codec`` (measured in bench/codec.py)
"""
from fpt.store.layout import CODECS, DEFAULT_CODEC, FEATURE_DTYPES, SAMPLE_ARRAYS, SCHEMA_VERSION, SPLITS, Geometry, choose_samples_per_shard
from fpt.store.location import StoreLocation, is_url, store_stem
from fpt.store.lock import StoreLock
from fpt.store.reader import StoreReader, as_dask, summarize
from fpt.store.verify import VerifyReport, verify
from fpt.store.writer import StoreWriter

__all__ = ["CODECS", "DEFAULT_CODEC", "FEATURE_DTYPES", "SAMPLE_ARRAYS", "SCHEMA_VERSION", "SPLITS", "Geometry", "choose_samples_per_shard", "StoreLocation", "StoreLock",
           "StoreReader", "StoreWriter", "as_dask", "is_url", "store_stem", "summarize", "verify", "VerifyReport"]
