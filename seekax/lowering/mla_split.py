"""FlashMLA's split-KV tile scheduler: `mla_metadata` gives every CTA of the MLA decode kernel equal work.

It lives beside the kernel that consumes it (`mosaic/mla_decode_sm90.py`) and the XLA split path
(`reference/mla_decode.py`); `seekax.ops.mla` re-exports it as part of the public op.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from seekax.ir.validate import check_int, fail
from seekax.lowering.backend import num_sms_for

FIXED_OVERHEAD_BLOCKS = 5  # FlashMLA's cost of starting a sequence (Q load, epilogue), in 64-token blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MlaMetadata:
    """Split-KV schedule (FlashMLA's tile-scheduler metadata), all int32 device arrays.

    The work line concatenates, per batch b, FIXED_OVERHEAD_BLOCKS units then n_blocks[b] KV blocks;
    part p (one CTA per row tile) owns units [p*payload, (p+1)*payload). A part touching batch b
    writes one partial (out, lse) at row split_offsets[b] + p - first_part[b]; the combine merges them.
    """

    block_start: jax.Array     # [B]   unit position of batch b's first KV block
    n_blocks: jax.Array        # [B]   ceil(seq_len / block)
    first_part: jax.Array      # [B]   first part touching batch b
    split_offsets: jax.Array   # [B+1] cumulative number of splits
    part_batches: jax.Array    # [P, 2] batches [begin, end) a part touches (possibly with empty ranges)
    payload: jax.Array         # [1]   units per part
    block: int = dataclasses.field(metadata=dict(static=True), default=64)

    @property
    def num_parts(self) -> int:
        return self.part_batches.shape[0]

    @property
    def max_splits(self) -> int:
        """Static bound on the number of partial rows: every part boundary adds at most one split."""
        return self.block_start.shape[0] + self.num_parts

    def part_block_range(self, p, b):
        """KV blocks [lo, hi) of batch b owned by part p (hi <= lo: nothing)."""
        start = self.block_start[b]
        lo = jnp.maximum(p * self.payload[0], start) - start
        hi = jnp.minimum((p + 1) * self.payload[0], start + self.n_blocks[b]) - start
        return lo, hi


def num_parts_for(num_sms: int, q_rows: int, block_m: int = 64) -> int:
    """FlashMLA's split: the SMs are shared by the row tiles (64 query rows = heads x q_len each)."""
    return max(1, num_sms // max(1, math.ceil(q_rows / block_m)))


def mla_metadata(seq_lens, num_sms: int | None = None, *, q_len: int = 1, num_heads: int = 128,
                 block: int = 64, num_parts: int | None = None, kv_heads: int = 1) -> MlaMetadata:
    """seq_lens [B] int32 -> the split schedule, jit-able (computed on device from the lengths).
    num_parts defaults to num_sms // ceil(q_len * num_heads / kv_heads / 64) so that all row tiles fill the SMs.
    kv_heads > 1 (FlashMLA's h_kv): the plan has one "batch" per (sequence, KV head), b * kv_heads + g, each
    with the q_len x num_heads / kv_heads query rows of KV head g."""
    if getattr(seq_lens, "ndim", None) != 1:
        raise fail("seq_lens.shape", getattr(seq_lens, "shape", None), "[batch]")
    check_int("block", block, min_value=1)
    kv_heads = check_int("kv_heads", kv_heads, min_value=1)
    if num_parts is None:
        num_sms = check_int("num_sms", num_sms if num_sms is not None else num_sms_for("auto"), min_value=1)
        heads = check_int("num_heads", num_heads, min_value=1)
        if heads % kv_heads:
            raise fail("num_heads", heads, f"a multiple of kv_heads={kv_heads}")
        rows = check_int("q_len", q_len, min_value=1) * (heads // kv_heads)
        num_parts = num_parts_for(num_sms, rows)
    num_parts = check_int("num_parts", num_parts, min_value=1)
    lens = jnp.maximum(seq_lens.astype(jnp.int32), 0)                       # [B]
    if kv_heads > 1:
        lens = jnp.repeat(lens, kv_heads)                                    # [B * kv_heads]
    n_blocks = (lens + block - 1) // block                                   # [B]
    cost = n_blocks + FIXED_OVERHEAD_BLOCKS                                  # [B]
    ends = jnp.cumsum(cost)                                                  # [B]
    block_start = ends - n_blocks                                            # [B]
    total = ends[-1] if lens.shape[0] else jnp.int32(0)
    payload = jnp.maximum((total + num_parts - 1) // num_parts, 1)          # []
    first_part = block_start // payload                                      # [B]
    last_part = (block_start + n_blocks - 1) // payload                      # [B]
    num_splits = jnp.where(n_blocks > 0, last_part - first_part + 1, 0)      # [B]
    split_offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(num_splits).astype(jnp.int32)])
    p = jnp.arange(num_parts, dtype=jnp.int32)                               # [P]
    begin = jnp.searchsorted(ends, p * payload, side="right")  # [P]
    end = jnp.searchsorted(block_start, (p + 1) * payload, side="left")     # [P]
    part_batches = jnp.stack([begin, jnp.maximum(end, begin)], axis=1).astype(jnp.int32)  # [P, 2]
    return MlaMetadata(block_start=block_start.astype(jnp.int32), n_blocks=n_blocks.astype(jnp.int32),
                       first_part=first_part.astype(jnp.int32), split_offsets=split_offsets,
                       part_batches=part_batches, payload=payload.reshape(1).astype(jnp.int32), block=block)


def split_ranges(metadata: MlaMetadata):
    """Per partial row t (of max_splits): (batch [T], key begin [T], key end [T]); rows past the last split
    get batch = B and an empty range. The XLA split path and the tests use this inverse map."""
    num_b = metadata.block_start.shape[0]
    t = jnp.arange(metadata.max_splits, dtype=jnp.int32)                            # [T]
    b = jnp.searchsorted(metadata.split_offsets[1:], t, side="right").astype(jnp.int32)  # [T]
    bc = jnp.clip(b, 0, num_b - 1)
    part = metadata.first_part[bc] + t - metadata.split_offsets[bc]                 # [T]
    lo, hi = metadata.part_block_range(part, bc)                                    # [T], [T]
    live = b < num_b
    return b, jnp.where(live, lo * metadata.block, 0), jnp.where(live, hi * metadata.block, 0)
