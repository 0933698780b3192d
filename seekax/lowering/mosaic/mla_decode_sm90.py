"""MLA decode for Hopper in Pallas Mosaic GPU (FlashMLA's dense bf16 decode kernel, split-KV).

Grid (row_tiles, parts): a CTA owns 64 query rows (rows = q_len x heads, flattened) and one part of the
balanced split schedule (`lowering.mla_split.MlaMetadata`); it walks the batches its part touches, and for each
writes one fp32 partial (out, lse) that the combine (`mla_combine_sm90.py`, or XLA) merges. Three warpgroups:
  wg 0: loads the Q tile (TMA), S = Q K^T over 576 channels (wgmma), mask, online softmax in fp32
        (row statistics as WGMMA.reduce(1) vectors), hands P (bf16) and the row rescale to wg 1 through
        shared memory, then P V for value channels [0, 256);
  wg 1: P V for value channels [256, 512);
  wg 2: reads block-table entries in the kernel and TMA-copies `kv_cache.at[page]` into `stages` slots.
Handshakes: kv_ready/kv_consumed per slot (TMA <-> both compute wgs), p_ready/p_free (wg 0 <-> wg 1;
the last message of a split carries 1/l instead of a rescale). Outputs are stored from registers.
Keys in the last page at or past seq_len may hold anything, NaN included (as FlashMLA's tests check):
S masks them, and wg 0 zeroes their value rows in shared memory before P V.

FP8 cache (DeepSeek-V3.2's layout: e4m3 latent, one f32 scale per token and 128 channels, bf16 rope; 656
instead of 1152 bytes per token): wg 2 TMA-copies a page's latent and rope into one fp8 slot, wg 1 dequantises
it (x * scale, scales read from global memory as WGMMA row vectors; tail keys zeroed on the way) into a single
bf16 tile and then does its P V as above; wg 0 runs unchanged on that tile. Two fp8 slots next to the bf16
tile would need 234 KiB, so the TMA of page j+1 overlaps the compute of page j through the one slot.

Sparse (DeepSeek-V3.2's top-k attention, FlashMLA's sparse decode): every query token is a "batch" of its own,
its table holds token ids (valid ones first, compacted by the wrapper) instead of page ids, and its length is
the number of valid ids. wg 2 gathers a step's 64 tokens with one single-row TMA each (ids past the length
are 0: one row, from L2) into an untiled staging slot; a swizzled tile cannot take single rows, so wg 1
copies the slot into the bf16 tile (WGMMA-layout loads, tail rows zeroed), as it dequantises in the FP8 mode;
wg 0 again runs unchanged. Those loads hit one bank per 8 rows (1152 B rows; a padded row stride does not lower), a cost
to measure on hardware. Sparse over the FP8 cache ("sparse_fp8"): the same gathers of latent (512 B) and rope
(128 B) rows into untiled fp8 slots, dequantised as in the FP8 mode; a token's scales (16 B, below what a
warpgroup's TMA may move) come pre-gathered per query token by the wrapper ([B, topk, 4] f32, 2.4 % of the bytes).

FlashMLA's wider surface: several KV heads (the wrapper runs one batch per sequence and KV head, wg 2 copies that
head's rows of each page), pages of 16, 32 or a multiple of 64 tokens (a step spans 64 / page pages, one TMA each,
or is part of one page), and for sparse decode an extra cache (wg 2 picks the source of each gathered token). The
attention sink and the lse of an empty query are the combine's (`mla_combine_sm90.py`).

Reading order: `CacheLayout` (which of the four front ends, and what `fp8` / `sparse` / `staged` mean), `Scratch`
(every shared-memory buffer and barrier by name), `_DecodeCta` (one CTA: a method per step; `softmax_wg`,
`value_wg` and `memory_wg` are the three warpgroups' loops, the other methods the steps they call), `_kernel`
(unpacks the operands, allocates `Scratch`, dispatches on the warpgroup index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.fp8 import SCALE_BLOCK
from seekax.ir.mla_tiling import MlaTileConfig
from seekax.ir.validate import check_choice
from seekax.lowering.backend import interpret_context
from seekax.lowering.mosaic import interpret_run_state
from seekax.lowering.mosaic.pipeline_common import COMPUTE_WG_REGISTERS, MEMORY_WG_REGISTERS, swizzled
from seekax.lowering.reference.mla_decode import apply_sink, combine_splits, fill_empty_lse, merge_kv_heads

CACHES = ("bf16", "fp8", "sparse", "sparse_fp8")
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
ROW = plgpu.Layout.WGMMA.reduce(1)      # a [64] vector, one value per row of a WGMMA-layout tile


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How one of CACHES reaches the bf16 tile the compute warpgroups read.

    fp8: pages of e4m3 latents, f32 scales and bf16 rope, dequantised by wg 1. sparse: the table holds token ids
    and wg 2 gathers one row per token. staged (either): TMA fills staging slots and wg 1 writes the single bf16
    tile; otherwise (the bf16 cache) TMA writes each page straight into one of `stages` bf16 tiles.
    page (paged caches): tokens per page; a 64-key step is part of one page (a multiple of 64) or spans 64 / page
    pages (16, 32), one TMA each. extra (sparse): a second cache whose token ids follow the first's.
    """

    cache: str
    page: int = 64
    extra: bool = False

    def __post_init__(self):
        check_choice("cache", self.cache, CACHES)
        if not self.sparse and not (self.page % 64 == 0 or self.page in (16, 32)):
            raise ValueError(f"page={self.page}: expected 16, 32 or a multiple of 64")
        if self.extra and not self.sparse:
            raise ValueError(f"extra={self.extra}: an extra cache is a sparse decode's (cache={self.cache!r})")

    def copies_per_step(self, bn: int) -> int:
        """TMA copies (per cache array) that fill one step: one row each (sparse), one per page, or one."""
        return bn if self.sparse else max(1, bn // self.page)

    def gathered_scales(self, bn: int) -> bool:
        """FP8 scales come gathered per batch ([B, tokens, 4], by the wrapper) rather than read from their pages:
        sparse (a token's 16 B is below a TMA row), and pages shorter than a step (a step's 64 scales are not
        one vector)."""
        return self.fp8 and (self.sparse or self.page < bn)

    @property
    def fp8(self) -> bool:
        return self.cache in ("fp8", "sparse_fp8")

    @property
    def sparse(self) -> bool:
        return self.cache in ("sparse", "sparse_fp8")

    @property
    def staged(self) -> bool:
        return self.fp8 or self.sparse


class Scratch(NamedTuple):
    """The kernel's shared memory by name, in allocation order (the order fixes each buffer's offset). A barrier
    field is an array of barriers indexed by tile or slot."""

    q: Any                      # [64, 576] the Q tile of the current batch (TMA -> wg 0)
    kv: Any                     # [tiles, 64, 576] bf16 keys (576 channels) and values (the first 512) for wgmma
    p: Any                      # [64, 64] P = exp2(S - m) in q's dtype (wg 0 -> wg 1)
    row_scale: Any              # [64] f32: a step's alpha, or 1/l after a split's last step (wg 0 -> wg 1)
    kv_ready: Any               # per tile: its keys are in (TMA; staged: wg 1 wrote the tile)
    kv_consumed: Any            # per tile: the compute warpgroups are done with it
    q_ready: Any                # the Q tile is in
    p_ready: Any                # P and row_scale are published
    p_free: Any                 # wg 1 has read P and row_scale
    latent: Any = None          # fp8: [stages, 64, 512] e4m3 staging slots
    rope: Any = None            # fp8: [stages, 64, 64] bf16 staging slots
    latent_ready: Any = None    # fp8: per slot, its latent is in
    rope_ready: Any = None      # fp8: per slot, its rope is in
    rows: Any = None            # sparse bf16: [stages, 64, 576] gathered token rows
    rows_ready: Any = None      # sparse bf16: per slot, its rows are in
    slot_free: Any = None       # staged: per slot, wg 1 has copied it into the bf16 tile


def _scratch_types(config: MlaTileConfig, layout: CacheLayout, *, dtype, kv_dtype, rope_dtype, d: int) -> Scratch:
    """`Scratch` as allocation types. dtype: q's; kv_dtype: the cache's (fp8: the latent's); d: 576.
    Sparse slots are untiled (a single-row TMA cannot write into an 8-row swizzled tile) and their ready
    barriers take one arrival per row copy. Sizes: `MlaTileConfig.smem_bytes`."""
    bm, bn, stages = config.block_m, config.block_n, config.stages
    if layout.staged:   # the one bf16 tile: written by wg 1 (kv_ready), released by wg 0 (kv_consumed)
        kv = plgpu.SMEM((1, bn, d), dtype, transforms=swizzled(dtype, d))
        kv_ready, kv_consumed = plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=1)
    else:               # TMA writes `stages` tiles (kv_ready); both compute warpgroups release one (kv_consumed)
        kv = plgpu.SMEM((stages, bn, d), kv_dtype, transforms=swizzled(kv_dtype, d))
        copies = layout.copies_per_step(bn)
        kv_ready, kv_consumed = (plgpu.Barrier(num_barriers=stages) if copies == 1 else
                                 plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
                                 plgpu.Barrier(num_arrivals=2, num_barriers=stages))
    arrivals = layout.copies_per_step(bn)
    staging = {}
    if layout.fp8:
        v = config.v_dim
        staging = dict(
            latent=plgpu.SMEM((stages, bn, v), kv_dtype, transforms=() if layout.sparse else swizzled(kv_dtype, v)),
            rope=plgpu.SMEM((stages, bn, d - v), rope_dtype,
                            transforms=() if layout.sparse else swizzled(rope_dtype, d - v)),
            latent_ready=plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
            rope_ready=plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages))
    elif layout.sparse:
        staging = dict(rows=plgpu.SMEM((stages, bn, d), kv_dtype),
                       rows_ready=plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages))
    if layout.staged:
        staging["slot_free"] = plgpu.Barrier(num_barriers=stages)
    return Scratch(
        q=plgpu.SMEM((bm, d), dtype, transforms=swizzled(dtype, d)),
        kv=kv,
        p=plgpu.SMEM((bm, bn), dtype, transforms=swizzled(dtype, bn)),
        row_scale=plgpu.SMEM((bm,), jnp.float32),
        kv_ready=kv_ready,
        kv_consumed=kv_consumed,
        q_ready=plgpu.Barrier(num_barriers=1),
        p_ready=plgpu.Barrier(num_barriers=1),
        p_free=plgpu.Barrier(num_barriers=1),
        **staging,
    )


@dataclasses.dataclass(frozen=True)
class _Gmem:
    """The kernel's global-memory operands by name (shapes in `_kernel`)."""

    block_start: Any            # split schedule (lowering.mla_split.MlaMetadata)
    n_blocks: Any
    first_part: Any
    split_offsets: Any
    part_batches: Any
    payload: Any
    q: Any
    kv: Any                     # bf16 pages or token rows; fp8: the e4m3 latent
    scales: Any                 # fp8 only
    rope: Any                   # fp8 only
    extra_kv: Any               # sparse with an extra cache: its token rows (fp8: its latent)
    extra_rope: Any             # sparse fp8 with an extra cache
    table: Any                  # page ids, or (sparse) token ids
    lens: Any
    out: Any                    # partials
    lse: Any


def _online_softmax(s, m_i, l_i):
    """One step of the base-2 online softmax over S [64, 64] (scaled, masked to -inf) -> (P, alpha, m, l): the new
    row max m, P = exp2(S - m), alpha = exp2(m_old - m) to rescale what was accumulated, the new row sum l.
    A row that has seen nothing keeps m = -inf and gets P = 0 (m_safe avoids -inf - -inf)."""
    m_new = jnp.maximum(m_i, s.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_i - m_safe)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    return p, alpha, m_new, l_i


def _row_vec(bm: int, value):
    return plgpu.layout_cast(jnp.full((bm,), value, jnp.float32), ROW)


def _zeros_acc(bm: int, vh: int):
    return plgpu.layout_cast(jnp.zeros((bm, vh), jnp.float32), plgpu.Layout.WGMMA)


@dataclasses.dataclass(frozen=True)
class _DecodeCta:
    """One CTA: query rows [rt * 64, rt * 64 + 64) over part `part` of the split schedule. Each warpgroup walks
    the same batches and steps (a step: one 64-key page or 64 gathered tokens); the methods are their steps."""

    gmem: _Gmem
    smem: Scratch
    config: MlaTileConfig
    layout: CacheLayout
    scale_log2: float           # softmax scale x log2(e): the softmax runs in base 2
    causal: bool
    q_len: int
    heads: int                  # query heads per KV head (the rows of one query token)
    kv_heads: int               # the cache's KV heads: batch b reads KV head b % kv_heads
    rt: Any                     # this CTA's row tile
    part: Any                   # this CTA's part
    payload: Any                # blocks per part
    batches: tuple              # [first, end) batches the part touches

    @property
    def kv_tiles(self) -> int:
        return 1 if self.layout.staged else self.config.stages

    # ------------------------------------------------------------------------------------------ schedule
    def block_range(self, b):
        """The blocks [lo, hi) of batch b this part owns (hi == lo: none)."""
        start = self.gmem.block_start[b]
        lo = jnp.maximum(self.part * self.payload, start) - start
        hi = jnp.minimum((self.part + 1) * self.payload, start + self.gmem.n_blocks[b]) - start
        return lo, jnp.maximum(hi, lo)

    def split_row(self, b):
        """The partial row this part writes for batch b."""
        return self.gmem.split_offsets[b] + self.part - self.gmem.first_part[b]

    def page_of(self, b, j):
        """Batch b's j-th page id, clamped into the cache (entries past a sequence's pages are never trusted)."""
        table = self.gmem.table
        return jnp.clip(table[b, jnp.minimum(j, table.shape[1] - 1)], 0, self.gmem.kv.shape[0] - 1)

    def kv_head(self, b):
        """The KV head batch b reads (the wrapper lays batches out as sequence x KV head)."""
        return 0 if self.kv_heads == 1 else lax.rem(b, self.kv_heads)

    def step_pages(self, b, j):
        """Where step j of batch b lives: [(page id, its rows, the rows of the slot they fill or None = all)]. A page
        of 64 keys is one step; a longer page holds page / 64 steps; a shorter one is 64 / page of a step."""
        bn, page = self.config.block_n, self.layout.page
        if page == bn:
            return [(self.page_of(b, j), slice(None), None)]
        if page > bn:
            per = page // bn
            return [(self.page_of(b, j // per), pl.ds(lax.rem(j, per) * bn, bn), None)]
        n = bn // page
        return [(self.page_of(b, j * n + i), slice(None), pl.ds(i * page, page)) for i in range(n)]

    # ------------------------------------------------------------------------------------------ wg 0: softmax
    def softmax_wg(self):
        """wg 0, per batch: load the Q tile; per step: S = Q K^T, mask, online softmax, hand P and alpha to wg 1,
        P V on value channels [0, 256); after the last step: hand 1/l to wg 1, store its half of out and lse."""
        plgpu.set_max_registers(COMPUTE_WG_REGISTERS, action="increase")
        smem, bm, bn, vh = self.smem, self.config.block_m, self.config.block_n, self.config.v_per_wg

        def batch(b, carry):
            step, msgs = carry
            lo, hi = self.block_range(b)

            @pl.when(hi > lo)
            def _():
                self.load_q(b)
                seq_len = self.gmem.lens[b]
                limit = self.key_limit(seq_len)

                def kv_step(j, c):
                    acc, m_i, l_i, step, msgs = c
                    slot = lax.rem(step, self.kv_tiles)
                    plgpu.barrier_wait(smem.kv_ready.at[slot])
                    s = self.scores(slot, j, limit)
                    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)
                    if not self.layout.staged:                  # staged: wg 1 zeroed the tail already
                        self.scrub_tail(slot, seq_len - j * bn)

                    @pl.when(msgs > 0)
                    def _():
                        plgpu.barrier_wait(smem.p_free.at[0])   # wg 1 is done with the last message
                    self.publish(alpha, p)
                    acc = self.pv(acc, alpha, slot, 0)
                    plgpu.barrier_arrive(smem.kv_consumed.at[slot])
                    return acc, m_new, l_i, step + 1, msgs + 1

                acc, m_i, l_i, _, _ = lax.fori_loop(
                    lo, hi, kv_step, (_zeros_acc(bm, vh), _row_vec(bm, -jnp.inf), _row_vec(bm, 0.0), step, msgs))
                inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
                plgpu.barrier_wait(smem.p_free.at[0])
                self.publish(inv)                               # the split's last message: 1/l
                t = self.split_row(b)
                inv_b = lax.broadcast_in_dim(inv, acc.shape, [0])
                self.gmem.out.at[t, pl.ds(self.rt * bm, bm), pl.ds(0, vh)][...] = acc * inv_b
                lse = jnp.where(l_i > 0, m_i * LN2 + jnp.log(jnp.where(l_i > 0, l_i, 1.0)), -jnp.inf)
                self.gmem.lse.at[t, pl.ds(self.rt * bm, bm)][...] = lse

            n = hi - lo
            return step + n, msgs + jnp.where(n > 0, n + 1, 0)

        _, msgs = lax.fori_loop(*self.batches, batch, (jnp.int32(0), jnp.int32(0)))

        @pl.when(msgs > 0)
        def _():
            plgpu.barrier_wait(smem.p_free.at[0])   # observe wg 1's last release before the barrier goes away

    def load_q(self, b):
        """TMA batch b's Q rows of this tile into smem.q and wait for them."""
        bm = self.config.block_m
        plgpu.copy_gmem_to_smem(self.gmem.q.at[b, pl.ds(self.rt * bm, bm)], self.smem.q, self.smem.q_ready.at[0])
        plgpu.barrier_wait(self.smem.q_ready.at[0])

    def key_limit(self, seq_len):
        """Per query row, how many keys it sees, as a row vector (a [64, 64] tensor would hold 32 more registers):
        seq_len, or with causal and q_len > 1, seq_len - q_len + i + 1 for query i = row // heads."""
        bm = self.config.block_m
        limit = plgpu.layout_cast(jnp.full((bm,), seq_len, jnp.int32), ROW)
        if self.causal and self.q_len > 1:      # the row iota only when used: unused, it stalls layout inference
            rows = self.rt * bm + plgpu.broadcasted_iota(jnp.int32, (bm,), 0, layout=ROW)
            limit = limit - (self.q_len - 1)
            for i in range(1, self.q_len):
                limit = limit + (rows >= i * self.heads).astype(jnp.int32)
        return limit

    def scores(self, slot, j, limit):
        """S = Q K^T [64 rows, 64 keys] of step j (f32 wgmma over 576 channels), times scale_log2, keys at or past
        a row's limit masked to -inf."""
        bm, bn = self.config.block_m, self.config.block_n

        def qk(r):
            plgpu.wgmma(r, self.smem.q, self.smem.kv.at[slot].T)
            plgpu.wgmma_wait(0)
            return r[...]
        s = pl.run_scoped(qk, plgpu.ACC((bm, bn), jnp.float32)) * self.scale_log2
        cols = plgpu.broadcasted_iota(jnp.int32, (bm, bn), 1, layout=plgpu.Layout.WGMMA)
        return jnp.where(cols < lax.broadcast_in_dim(limit - j * bn, s.shape, [0]), s, -jnp.inf)

    def scrub_tail(self, slot, valid):
        """Zero the value rows at or past seq_len in a partial last page (garbage or NaN there would survive
        P = 0 as 0 x NaN in the P V wgmma). Runs before P is published to wg 1."""
        bn = self.config.block_n

        @pl.when(valid < bn)
        def _():
            key = plgpu.broadcasted_iota(jnp.int32, (bn, 64), 0, layout=plgpu.Layout.WGMMA)
            for c in range(self.config.v_dim // 64):
                chunk = self.smem.kv.at[slot, :, pl.ds(c * 64, 64)]
                vals = plgpu.load(chunk, layout=plgpu.Layout.WGMMA)
                chunk[...] = jnp.where(key < valid, vals, jnp.zeros_like(vals))

    def publish(self, row_scale, p=None):
        """wg 0 -> wg 1, once wg 1 released the previous message: P (a step; none in a split's last message) and
        the row scale (alpha, or 1/l), made visible to wgmma and signalled on p_ready."""
        if p is not None:
            self.smem.p[...] = p.astype(self.gmem.q.dtype)
        self.smem.row_scale[...] = row_scale
        plgpu.commit_smem()
        plgpu.barrier_arrive(self.smem.p_ready.at[0])

    def receive(self):
        """wg 1: wait for wg 0's next message and read its row scale (release it with p_free)."""
        plgpu.barrier_wait(self.smem.p_ready.at[0])
        return plgpu.load(self.smem.row_scale, layout=ROW)

    def pv(self, acc, alpha, slot, col: int):
        """acc * alpha + P V[:, col:col + 256], this warpgroup's value channels, with one wgmma accumulating in
        place on the accumulator registers (`ACC.init`: a second 64 x 256 f32 accumulator would not fit). The CPU
        interpreter runs this same code (`interpret_run_state`)."""
        vh = self.config.v_per_wg
        v = self.smem.kv.at[slot, :, pl.ds(col, vh)]                        # [64 keys, vh], static columns
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return pl.run_state(lambda r: plgpu.wgmma(r, self.smem.p, v))(plgpu.ACC.init(acc))

    # ------------------------------------------------------------------------------------------ wg 1: values
    def value_wg(self):
        """wg 1, per step: (staged) write the bf16 tile, take alpha from wg 0, P V on value channels [256, 512);
        after the last step: take 1/l, store its half of out."""
        plgpu.set_max_registers(COMPUTE_WG_REGISTERS, action="increase")
        smem, staged = self.smem, self.layout.staged
        bm, vh = self.config.block_m, self.config.v_per_wg

        def batch(b, step):
            lo, hi = self.block_range(b)

            @pl.when(hi > lo)
            def _():
                def kv_step(j, c):
                    acc, step = c
                    if staged:
                        self.fill_tile(b, j, step)              # writes and publishes the bf16 tile
                    slot = lax.rem(step, self.kv_tiles)
                    alpha = self.receive()
                    if not staged:                              # staged: this wg wrote the tile itself
                        plgpu.barrier_wait(smem.kv_ready.at[slot])
                    acc = self.pv(acc, alpha, slot, vh)
                    plgpu.barrier_arrive(smem.p_free.at[0])
                    if not staged:                              # staged: wg 0 alone releases the tile
                        plgpu.barrier_arrive(smem.kv_consumed.at[slot])
                    return acc, step + 1

                acc, _ = lax.fori_loop(lo, hi, kv_step, (_zeros_acc(bm, vh), step))
                inv = self.receive()
                plgpu.barrier_arrive(smem.p_free.at[0])
                self.gmem.out.at[self.split_row(b), pl.ds(self.rt * bm, bm), pl.ds(vh, vh)][...] = (
                    acc * lax.broadcast_in_dim(inv, acc.shape, [0]))

            return step + (hi - lo)

        steps = lax.fori_loop(*self.batches, batch, jnp.int32(0))
        if staged:
            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(smem.kv_consumed.at[0])  # observe wg 0's last release before the barrier goes away

    def fill_tile(self, b, j, step):
        """Staged (wg 1): step j of batch b from its staging slot into the bf16 tile, keys at or past the length
        zeroed (the scrub, folded in): FP8 latents dequantised and the rope copied, or the gathered rows copied.
        Then the slot is free for wg 2 and the tile ready for wg 0."""
        smem, bn, config = self.smem, self.config.block_n, self.config
        slot = lax.rem(step, config.stages)

        @pl.when(step > 0)
        def _():
            plgpu.barrier_wait(smem.kv_consumed.at[0])      # wg 0 is done with the previous tile
        for ready in ((smem.latent_ready, smem.rope_ready) if self.layout.fp8 else (smem.rows_ready,)):
            plgpu.barrier_wait(ready.at[slot])
        valid = self.gmem.lens[b] - j * bn
        key = plgpu.broadcasted_iota(jnp.int32, (bn, 64), 0, layout=plgpu.Layout.WGMMA)
        if self.layout.fp8:
            self.dequantise_latent(b, j, slot, valid)
            copied = [(smem.rope.at[slot, :, pl.ds(c * 64, 64)], config.v_dim + c * 64)
                      for c in range((config.qk_dim - config.v_dim) // 64)]
        else:
            copied = [(smem.rows.at[slot, :, pl.ds(c * 64, 64)], c * 64) for c in range(config.qk_dim // 64)]
        for src, col in copied:
            r = plgpu.load(src, layout=plgpu.Layout.WGMMA, optimized=not self.layout.sparse)  # sparse: untiled
            smem.kv.at[0, :, pl.ds(col, 64)][...] = jnp.where(key < valid, r, jnp.zeros_like(r))
        plgpu.commit_smem()                                 # generic-proxy writes -> wgmma reads
        plgpu.barrier_arrive(smem.slot_free.at[slot])
        plgpu.barrier_arrive(smem.kv_ready.at[0])

    def dequantise_latent(self, b, j, slot, valid):
        """FP8 (wg 1): latent channels [0, 512) of a staging slot into the bf16 tile, one scale group of 128
        channels at a time: e4m3 x the token's scale in f32, zeroed at or past the length, rounded to bf16.
        Scales are read from global memory as a row vector (sparse and pages < 64: pre-gathered per batch)."""
        smem, bn, sparse = self.smem, self.config.block_n, self.layout.sparse
        key = plgpu.broadcasted_iota(jnp.int32, (bn, SCALE_BLOCK), 0, layout=plgpu.Layout.WGMMA)
        keep = key < valid
        for g in range(self.config.v_dim // SCALE_BLOCK):
            x = plgpu.load(smem.latent.at[slot, :, pl.ds(g * SCALE_BLOCK, SCALE_BLOCK)], layout=plgpu.Layout.WGMMA,
                           optimized=not sparse)
            scales = self.gmem.scales
            if self.layout.gathered_scales(bn):
                row = scales.at[b, pl.ds(j * bn, bn), g]
            else:
                (page, rows, _), = self.step_pages(b, j)
                row = scales.at[page, rows, self.kv_head(b), g]
            sc = plgpu.load(row, layout=ROW, optimized=False)
            y = x.astype(jnp.float32) * lax.broadcast_in_dim(sc, x.shape, [0])
            y = jnp.where(keep, y, jnp.zeros_like(y)).astype(self.gmem.q.dtype)
            for h in range(SCALE_BLOCK // 64):
                smem.kv.at[0, :, pl.ds(g * SCALE_BLOCK + h * 64, 64)][...] = y[:, h * 64:(h + 1) * 64]

    # ------------------------------------------------------------------------------------------ wg 2: memory
    def memory_wg(self):
        """wg 2, per step: wait until the step's slot is free, then TMA the step's keys into it. After the last
        step: observe each slot's final release before the barriers go away."""
        plgpu.set_max_registers(MEMORY_WG_REGISTERS, action="decrease")
        stages = self.config.stages
        slot_free = self.smem.slot_free if self.layout.staged else self.smem.kv_consumed   # who releases a slot

        def batch(b, step):
            lo, hi = self.block_range(b)

            def load(j, step):
                slot = lax.rem(step, stages)

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(slot_free.at[slot])
                if self.layout.sparse:
                    self.gather_tokens(b, j, slot)
                else:
                    self.copy_page(b, j, slot)
                return step + 1

            return lax.fori_loop(lo, hi, load, step)

        steps = lax.fori_loop(*self.batches, batch, jnp.int32(0))

        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _drain(step):
            plgpu.barrier_wait(slot_free.at[lax.rem(step, stages)])

    def copy_page(self, b, j, slot):
        """Paged: step j of batch b (its KV head's rows of one page, or of 64 / page pages, one TMA each), the bf16
        rows into tile `slot`, or the FP8 latent and rope into staging slot `slot`."""
        g, s, head = self.gmem, self.smem, self.kv_head(b)
        at = lambda ref, rows: ref.at[slot] if rows is None else ref.at[slot, rows]  # noqa: E731
        for page, src, dst in self.step_pages(b, j):
            if self.layout.fp8:
                plgpu.copy_gmem_to_smem(g.kv.at[page, src, head, :], at(s.latent, dst), s.latent_ready.at[slot])
                plgpu.copy_gmem_to_smem(g.rope.at[page, src, head, :], at(s.rope, dst), s.rope_ready.at[slot])
            else:
                plgpu.copy_gmem_to_smem(g.kv.at[page, src, head, :], at(s.kv, dst), s.kv_ready.at[slot])

    def gather_tokens(self, b, j, slot):
        """Sparse: the 64 token ids of batch b's step j, one single-row TMA each into staging slot `slot`
        (ids past the length are 0: one row, re-read from L2). With an extra cache, ids past the main cache's
        tokens are the extra cache's."""
        g, s, bn = self.gmem, self.smem, self.config.block_n

        def copy_row(kv, rope, token, r):
            if self.layout.fp8:
                plgpu.copy_gmem_to_smem(kv.at[pl.ds(token, 1)], s.latent.at[slot, pl.ds(r, 1)],
                                        s.latent_ready.at[slot])
                plgpu.copy_gmem_to_smem(rope.at[pl.ds(token, 1)], s.rope.at[slot, pl.ds(r, 1)],
                                        s.rope_ready.at[slot])
            else:
                plgpu.copy_gmem_to_smem(kv.at[pl.ds(token, 1)], s.rows.at[slot, pl.ds(r, 1)], s.rows_ready.at[slot])

        @pl.loop(0, bn)
        def _gather(r):
            if not self.layout.extra:
                copy_row(g.kv, g.rope, jnp.clip(g.table[b, j * bn + r], 0, g.kv.shape[0] - 1), r)
                return
            main = g.kv.shape[0]
            token = jnp.clip(g.table[b, j * bn + r], 0, main + g.extra_kv.shape[0] - 1)
            pl.when(token < main)(lambda: copy_row(g.kv, g.rope, token, r))
            pl.when(token >= main)(lambda: copy_row(g.extra_kv, g.extra_rope, token - main, r))


def _kernel(block_start_ref, n_blocks_ref, first_part_ref, split_offsets_ref, part_batches_ref, payload_ref,
            q_ref, *refs, config: MlaTileConfig, scale_log2: float, causal: bool, q_len: int, heads: int,
            cache: str, extra: bool):
    """q_ref [B, R, 576]; then the cache: kv_ref [pages, page, h_kv, 576] (bf16), or for "fp8" latent_ref
    [pages, page, h_kv, 512] e4m3, scales_ref [pages, page, h_kv, 4] f32 (pages < 64: gathered per batch,
    [B, tokens, 4]), rope_ref [pages, page, h_kv, 64] bf16, or for "sparse" kv_ref [tokens, 576] (extra: then
    extra_kv_ref [tokens2, 576]), or for "sparse_fp8" latent_ref [tokens, 512], scales_ref [B, max_tokens, 4]
    (gathered), rope_ref [tokens, 64] (extra: then extra latent and rope); then table_ref [B, max_pages] (sparse:
    [B, max_tokens] token ids); lens_ref [B]; out_ref [T, R, 512] f32 partials; lse_ref [T, R] f32 (natural log).
    Batch b of a paged cache with h_kv heads reads KV head b % h_kv; `heads` is the query heads per KV head."""
    fp8, sparse = cache in ("fp8", "sparse_fp8"), cache.startswith("sparse")
    n_cache = (3 if fp8 else 1) + ((2 if fp8 else 1) if extra else 0)
    cache_refs, (table_ref, lens_ref, out_ref, lse_ref) = refs[:n_cache], refs[n_cache:]
    if fp8:
        kv_ref, scales_ref, rope_ref, *extra_refs = cache_refs
    else:
        (kv_ref, *extra_refs), scales_ref, rope_ref = cache_refs, None, None
    extra_kv_ref, extra_rope_ref = (extra_refs + [None, None])[:2]
    layout = CacheLayout(cache, page=64 if sparse else kv_ref.shape[1], extra=extra)
    gmem = _Gmem(block_start=block_start_ref, n_blocks=n_blocks_ref, first_part=first_part_ref,
                 split_offsets=split_offsets_ref, part_batches=part_batches_ref, payload=payload_ref, q=q_ref,
                 kv=kv_ref, scales=scales_ref, rope=rope_ref, extra_kv=extra_kv_ref, extra_rope=extra_rope_ref,
                 table=table_ref, lens=lens_ref, out=out_ref, lse=lse_ref)
    rt, part, wg = lax.axis_index("rt"), lax.axis_index("part"), lax.axis_index("wg")
    payload = payload_ref[0]
    batches = (part_batches_ref[part, 0], part_batches_ref[part, 1])

    def scoped(smem: Scratch):
        cta = _DecodeCta(gmem=gmem, smem=smem, config=config, layout=layout, scale_log2=scale_log2, causal=causal,
                         q_len=q_len, heads=heads, kv_heads=1 if sparse else kv_ref.shape[2], rt=rt, part=part,
                         payload=payload, batches=batches)
        pl.when(wg == 0)(cta.softmax_wg)
        pl.when(wg == 1)(cta.value_wg)
        pl.when(wg == 2)(cta.memory_wg)

    scratch = _scratch_types(config, layout, dtype=q_ref.dtype, kv_dtype=kv_ref.dtype,
                             rope_dtype=None if rope_ref is None else rope_ref.dtype, d=q_ref.shape[-1])
    pl.run_scoped(scoped, scratch, collective_axes="wg")


def build(*, batch: int, rows: int, num_parts: int, max_splits: int, config: MlaTileConfig, scale: float,
          causal: bool, q_len: int, heads: int, cache: str = "bf16", extra: bool = False):
    """The kernel callable f(metadata arrays..., q [B, rows, 576], kv_cache | (latent, scales, rope) | flat
    tokens (+ the extra cache's), block_table | token table, seq_lens) -> (out partials [max_splits, rows, 512]
    f32, lse partials [max_splits, rows] f32). `cache`: one of CACHES; `heads`: query heads per KV head. Runs on
    the GPU or, unchanged, in the CPU interpreter."""
    layout = CacheLayout(cache, extra=extra)
    config.check_smem("float8_e4m3fn" if layout.fp8 else "bfloat16", sparse=layout.sparse)
    if rows % config.block_m:
        raise ValueError(f"rows={rows}: expected a multiple of block_m={config.block_m} (the wrapper pads)")
    interpret_run_state.enable()         # the interpreter then runs pv's in-place accumulation as the GPU does
    body = functools.partial(_kernel, config=config, scale_log2=scale * LOG2E, causal=causal, q_len=q_len,
                             heads=heads, cache=cache, extra=extra)
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((max_splits, rows, config.v_dim), jnp.float32),
                  jax.ShapeDtypeStruct((max_splits, rows), jnp.float32)),
        grid=(rows // config.block_m, num_parts),
        grid_names=("rt", "part"),
        num_threads=config.num_compute_wgs + 1,
        thread_name="wg",
        # reduction_scratch_bytes=0: row reductions stay in registers
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
    )


def _step_scales(scales, table, kv_heads: int, bn: int):
    """FP8 pages shorter than a step: each batch's scales in token order, [B, tokens, 4] f32 (tokens: the block
    table's capacity rounded up to whole steps), so a step's 64 scales are one row vector. scales [P, page, h_kv,
    4]; table [B, max_pages] (batch b: KV head b % h_kv). 16 B a token of the table's capacity, in XLA."""
    num_pages, page = scales.shape[:2]
    b, max_pages = table.shape
    t = jnp.arange(-(-max_pages * page // bn) * bn, dtype=jnp.int32)                     # [tokens]
    pages = jnp.clip(table[:, jnp.minimum(t // page, max_pages - 1)], 0, num_pages - 1)  # [B, tokens]
    heads = jnp.arange(b, dtype=jnp.int32)[:, None] % kv_heads                          # [B, 1]
    return scales[pages, t[None] % page, heads]                                          # [B, tokens, 4]


def mla_decode(q, cache: tuple, block_table, seq_lens, metadata, *, mode: str, softmax_scale: float, causal: bool,
               config: MlaTileConfig, interpret: bool = False, extra: bool = False, attn_sink=None,
               lse_empty: float = -math.inf):
    """Validated inputs (ops.mla) -> out [B, q_len, H, 512] q.dtype, lse [B, H, q_len] f32. `mode`: one of CACHES.
    `cache`: "bf16" (kv [pages, page, h_kv, 576],), "fp8" DeepSeek-V3.2's cache (latent e4m3 [pages, page, h_kv,
    512], scales f32 [pages, page, h_kv, 4], rope bf16 [pages, page, h_kv, 64]); "sparse" (flat bf16 [tokens,
    576],) or "sparse_fp8" (latent [tokens, 512], scales gathered per batch [B, max_tokens, 4], rope [tokens, 64]),
    with `extra` followed by the extra cache's rows (bf16) or latent and rope (fp8); then block_table [B, max_pages]
    (sparse: [B, max_tokens] token ids, valid ones first, extra ids offset by the main cache's tokens) and seq_lens
    [B] (sparse: the valid counts; ops.mla builds these, one "batch" per query token). Several KV heads: the kernel
    runs one batch per (sequence, KV head), its rows that head's query heads. attn_sink [H] and lse_empty are
    applied by the combine."""
    layout = CacheLayout(mode, extra=extra)
    b, q_len, heads, d = q.shape
    kv_heads = 1 if layout.sparse else cache[0].shape[2]
    hpk, bn = heads // kv_heads, config.block_n
    rows = q_len * hpk
    rows_p = -(-rows // config.block_m) * config.block_m
    if kv_heads == 1:
        qf = q.reshape(b, rows, d)                                              # rows ordered (q_len, heads)
    else:                                                                       # batch b * h_kv + g: KV head g
        qf = jnp.transpose(q.reshape(b, q_len, kv_heads, hpk, d), (0, 2, 1, 3, 4)).reshape(b * kv_heads, rows, d)
        block_table, seq_lens = jnp.repeat(block_table, kv_heads, axis=0), jnp.repeat(seq_lens, kv_heads)
    if rows_p != rows:
        qf = jnp.pad(qf, ((0, 0), (0, rows_p - rows), (0, 0)))                 # [B*h_kv, rows_p, 576]
    if layout.fp8 and not layout.sparse and cache[0].shape[1] < bn:
        cache = (cache[0], _step_scales(cache[1], block_table, kv_heads, bn), cache[2])
    kernel = build(batch=qf.shape[0], rows=rows_p, num_parts=metadata.num_parts, max_splits=metadata.max_splits,
                   config=config, scale=softmax_scale, causal=causal, q_len=q_len, heads=hpk, cache=mode, extra=extra)
    ctx = interpret_context if interpret else contextlib.nullcontext  # a fresh context per kernel call
    with ctx():
        out_p, lse_p = kernel(metadata.block_start, metadata.n_blocks, metadata.first_part, metadata.split_offsets,
                              metadata.part_batches, metadata.payload, qf, *cache, block_table, seq_lens)
    bg, v = qf.shape[0], config.v_dim
    if config.combine == "kernel":
        from seekax.lowering.mosaic import mla_combine_sm90

        sink = None
        if attn_sink is not None:                                               # [h_kv, rows_p]: row r's head
            sink = jnp.broadcast_to(attn_sink.astype(jnp.float32).reshape(kv_heads, 1, hpk), (kv_heads, q_len, hpk))
            sink = jnp.pad(sink.reshape(kv_heads, rows), ((0, 0), (0, rows_p - rows)))
        with ctx():
            out, lse = mla_combine_sm90.combine(metadata.split_offsets, out_p, lse_p, out_dtype=q.dtype,
                                                sink_rows=sink, lse_empty=lse_empty)
        out = out[:, :rows].reshape(bg, q_len, hpk, v)                             # [B*h_kv, q_len, H/h_kv, 512]
        lse = jnp.transpose(lse[:, :rows].reshape(bg, q_len, hpk), (0, 2, 1))      # [B*h_kv, H/h_kv, q_len]
        return merge_kv_heads(out, lse, kv_heads=kv_heads)
    t = metadata.max_splits
    out_p = out_p[:, :rows].reshape(t, q_len, hpk, v)                              # [T, q_len, H/h_kv, 512]
    lse_p = jnp.transpose(lse_p[:, :rows].reshape(t, q_len, hpk), (0, 2, 1))       # [T, H/h_kv, q_len]
    out, lse = merge_kv_heads(*combine_splits(out_p, lse_p, metadata.split_offsets, out_dtype=jnp.float32),
                              kv_heads=kv_heads)
    return apply_sink(out, lse, attn_sink).astype(q.dtype), fill_empty_lse(lse, lse_empty)
