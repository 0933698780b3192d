"""The storage runtime (the roles of 3FS and smallpond): sample store, grain loader, orbax checkpoints,
KV-cache page store, DuckDB data preparation, ArrayRecord import/export. Loader and TrainCheckpointer load
lazily (they pull in jax, grain and orbax; data-preparation worker processes import this package and need none
of them)."""

from seekax.storage.arrayrecord import export_array_record as export_array_record
from seekax.storage.arrayrecord import import_array_record as import_array_record
from seekax.storage.atomic import StorageFullError as StorageFullError
from seekax.storage.checkpoint_crc import CorruptCheckpointError as CorruptCheckpointError
from seekax.storage.extras import require_data_extra as require_data_extra
from seekax.storage.kv_store import KVPageStore as KVPageStore
from seekax.storage.prep import Session as Session
from seekax.storage.sample_store import CorruptStoreError as CorruptStoreError
from seekax.storage.sample_store import IncompleteStoreError as IncompleteStoreError
from seekax.storage.sample_store import SampleStore as SampleStore
from seekax.storage.sample_store import SampleStoreWriter as SampleStoreWriter
from seekax.storage.sample_store import write_token_store as write_token_store

_LAZY = {"Loader": "seekax.storage.loader", "LoaderConfig": "seekax.storage.loader",
         "TrainCheckpointer": "seekax.storage.checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seekax.storage' has no attribute {name!r}")
