"""Epoch orders: which records make global batch `step`, as a pure function of (seed, step).

Because the order is recomputed from the seed, a loader's whole state is one global batch counter.
Modes: "random" (a full permutation per epoch: any record anywhere), "block" (contiguous blocks of
`block_records` in a permuted block order: batches read a few long runs, close to sequential speed),
"sequential" (no shuffle). The last partial batch of an epoch is dropped so every batch is full.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from seekax.ir.validate import check_choice, check_int, fail

MODES = ("random", "block", "sequential")


def epoch_order(num_records: int, *, seed: int, epoch: int, mode: str = "random",
                block_records: int = 64) -> np.ndarray:
    """Record indices [num_records] int64 in the order epoch `epoch` visits them."""
    check_choice("mode", mode, MODES)
    if mode == "sequential":
        return np.arange(num_records, dtype=np.int64)
    rng = np.random.default_rng([check_int("seed", seed), check_int("epoch", epoch)])
    if mode == "random":
        return rng.permutation(num_records).astype(np.int64)
    block_records = check_int("block_records", block_records, min_value=1)
    num_blocks = -(-num_records // block_records)
    blocks = rng.permutation(num_blocks)
    starts = blocks * block_records
    order = (starts[:, None] + np.arange(block_records)[None, :]).reshape(-1)
    return order[order < num_records].astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """Maps a global batch counter to record indices. `num_epochs=None`: repeat forever."""

    num_records: int
    global_batch_size: int
    seed: int = 0
    mode: str = "random"
    block_records: int = 64
    num_epochs: int | None = None

    def __post_init__(self):
        check_int("num_records", self.num_records, min_value=1)
        check_int("global_batch_size", self.global_batch_size, min_value=1)
        check_int("seed", self.seed)
        check_choice("mode", self.mode, MODES)
        check_int("block_records", self.block_records, min_value=1)
        if self.num_epochs is not None:
            check_int("num_epochs", self.num_epochs, min_value=1)
        if self.global_batch_size > self.num_records:
            raise fail("global_batch_size", self.global_batch_size, f"<= num_records ({self.num_records})")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_records // self.global_batch_size

    @property
    def num_batches(self) -> int:
        """Total batches (epochs x batches per epoch); a very large number when repeating forever."""
        epochs = self.num_epochs if self.num_epochs is not None else (1 << 40) // self.batches_per_epoch
        return epochs * self.batches_per_epoch

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs' orders, bounded; the sampler lives for the run
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.num_records, seed=self.seed, epoch=epoch, mode=self.mode,
                           block_records=self.block_records)

    def batch_indices(self, step: int, *, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Record indices of global batch `step` [global_batch_size // process_count]: this process's rows."""
        step = check_int("step", step)
        if step >= self.num_batches:
            raise IndexError(f"step={step}: past the last batch ({self.num_batches})")
        epoch, k = divmod(step, self.batches_per_epoch)
        rows = self._order(epoch)[k * self.global_batch_size:(k + 1) * self.global_batch_size]
        per = self.global_batch_size // process_count
        return rows[process_index * per:(process_index + 1) * per]
