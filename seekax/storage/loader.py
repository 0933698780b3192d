"""Loader: grain pipeline whose element is a whole batch, yielding `jax.Array`s sharded over a mesh's data axis.

Element `step` of the grain `MapDataset` is this process's rows of global batch `step` (see `order.BatchPlan`),
read by `SampleStore.read` in one sorted, coalesced call. grain supplies the threads, the prefetch buffer and
the iterator state; since batches are a pure function of (seed, step), that state is one counter and a resumed
loader yields byte for byte the batches an uninterrupted one would.

Multi-process: each process reads only rows [p * B/P, (p+1) * B/P) of each global batch (P = process count).
`process_index`/`process_count` default to jax's and can be overridden (processes launched without
`jax.distributed`, tests).

Every batch is checked against the store's per-record checksums (`verify_reads=False` to skip, for a store
opened here from a path). `tokenizer=` (a tokenizer.json path, "bytes", or a tokenizer object) makes the loader
refuse a store packed with another tokenizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from seekax.ir.validate import check_int, fail
from seekax.storage.extras import require_data_extra

require_data_extra("grain", feature="seekax.storage.Loader")
import grain  # noqa: E402 - after the check that names the extra

from seekax.storage.order import BatchPlan  # noqa: E402
from seekax.storage.sample_store import SampleStore  # noqa: E402
from seekax.storage.tokenizer import ByteTokenizer, HFTokenizer, check_store_tokenizer  # noqa: E402

STATE_VERSION = 1
READAHEAD_BYTES = 16 << 20  # default read-ahead window: measured best for 0.5-2 MiB shuffle blocks (BENCHMARKS.md)


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    global_batch_size: int
    seed: int = 0
    shuffle: str = "random"  # "random" | "block" | "sequential" (see order.py)
    block_records: int = 64
    num_epochs: int | None = None
    # grain threads reading whole batches, and batches they keep in flight. One thread is enough: the disk's
    # queue depth comes from `readahead`, and every extra thread costs the GIL (warm, 512 KiB batches on 2 cores:
    # 2400-2900 MiB/s with 1 thread and 2 in flight, 600-1300 MiB/s with 2 threads and 8; BENCHMARKS.md).
    num_threads: int = 1
    prefetch: int = 2
    # batches ahead whose byte ranges are hinted to the kernel (posix_fadvise WILLNEED): the I/O queue depth,
    # without threads. None: as many batches as fill READAHEAD_BYTES (at least 2).
    readahead: int | None = None
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self):
        check_int("num_threads", self.num_threads, min_value=1)
        check_int("prefetch", self.prefetch, min_value=0)
        if self.readahead is not None:
            check_int("readahead", self.readahead, min_value=0)
        if (self.process_index is None) != (self.process_count is None):
            raise fail("process_index", self.process_index, "set together with process_count (or neither)")
        if self.process_count is not None:
            check_int("process_count", self.process_count, min_value=1)
            check_int("process_index", self.process_index)
            if self.process_index >= self.process_count:
                raise fail("process_index", self.process_index, f"< process_count ({self.process_count})")
            if self.global_batch_size % self.process_count:
                raise fail("global_batch_size", self.global_batch_size,
                           f"a multiple of process_count ({self.process_count})")


class _BatchSource:
    """grain random-access source: item i = this process's rows of global batch i, [local_batch, seq_len]."""

    def __init__(self, store: SampleStore, plan: BatchPlan, process_index: int, process_count: int, readahead: int):
        self.store, self.plan, self.pi, self.pc, self.readahead = store, plan, process_index, process_count, readahead
        self._hinted = -1  # last step whose rows were hinted (threads may race on it: a repeated hint is harmless)

    def __len__(self) -> int:
        return self.plan.num_batches

    def _rows(self, step: int) -> np.ndarray:
        return self.plan.batch_indices(step, process_index=self.pi, process_count=self.pc)

    def __getitem__(self, step: int) -> np.ndarray:
        if self.readahead:
            # Hint every not-yet-hinted step up to step + readahead (on a fresh or resumed iterator that is the
            # whole window; afterwards one step per call).
            last = min(step + self.readahead, self.plan.num_batches - 1)
            inside = step <= self._hinted <= step + self.readahead  # continuing the current window
            for ahead in range(self._hinted + 1 if inside else step + 1, last + 1):
                self.store._advise_valid(self._rows(ahead))  # BatchPlan's indices: int64, in range
            self._hinted = max(self._hinted, last) if inside else last
        return self.store._read_valid(self._rows(step))


class Loader:
    """Iterates batches of a token store. `sharding`: a `jax.sharding.Sharding` for [batch, seq_len] (e.g.
    `NamedSharding(mesh, P("data"))`); None yields numpy arrays of this process's rows.

    `get_state()` -> JSON-able dict (global batch counter + a fingerprint of the order); `set_state(state)`.
    """

    def __init__(self, store: SampleStore | str, config: LoaderConfig, *, sharding=None, tokenizer=None,
                 verify_reads: bool = True):
        self.store = store if isinstance(store, SampleStore) else SampleStore(store, verify_reads=verify_reads)
        if self.store.kind != "tokens":
            raise fail("store.kind", self.store.kind, "'tokens' (the loader batches fixed-size records)")
        if tokenizer is not None:
            if isinstance(tokenizer, str) and tokenizer == "bytes":
                tokenizer = ByteTokenizer()
            elif not hasattr(tokenizer, "identity"):
                tokenizer = HFTokenizer(tokenizer)
            check_store_tokenizer(self.store.manifest.get("metadata", {}), tokenizer)
        self.config, self.sharding = config, sharding
        if config.process_count is None:
            import jax

            self.process_index, self.process_count = jax.process_index(), jax.process_count()
        else:
            self.process_index, self.process_count = config.process_index, config.process_count
        if config.global_batch_size % self.process_count:
            raise fail("global_batch_size", config.global_batch_size,
                       f"a multiple of process_count ({self.process_count})")
        self.plan = BatchPlan(num_records=self.store.num_records, global_batch_size=config.global_batch_size,
                              seed=config.seed, mode=config.shuffle, block_records=config.block_records,
                              num_epochs=config.num_epochs)
        self.local_batch = config.global_batch_size // self.process_count
        readahead = config.readahead
        if readahead is None:
            batch_bytes = self.local_batch * self.store.record_bytes
            readahead = max(2, READAHEAD_BYTES // batch_bytes)
        self.readahead = readahead
        source = _BatchSource(self.store, self.plan, self.process_index, self.process_count, readahead)
        self._dataset = grain.MapDataset.source(source).to_iter_dataset(
            grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch))
        self._it = iter(self._dataset)

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def _fingerprint(self) -> dict[str, Any]:
        c = asdict(self.config)
        keep = ("global_batch_size", "seed", "shuffle", "block_records", "num_epochs")
        return {**{k: c[k] for k in keep}, "num_records": self.store.num_records, "seq_len": self.store.seq_len}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "step": int(self._it.get_state()["next_index"]),
                "order": self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "step" not in state:
            raise fail("state", state, f"a dict from Loader.get_state (version {STATE_VERSION})")
        if state.get("order") != self._fingerprint():
            raise fail("state.order", state.get("order"), f"this loader's order {self._fingerprint()}")
        self._it = iter(self._dataset)
        self._it.set_state({"next_index": check_int("state.step", state["step"])})

    def __iter__(self) -> "Loader":
        return self

    def __next__(self):
        local = next(self._it)
        if self.sharding is None:
            return local
        import jax

        global_rows = self.config.global_batch_size if not self.sharding.is_fully_addressable else self.local_batch
        return jax.make_array_from_process_local_data(self.sharding, local, (global_rows, local.shape[1]))
