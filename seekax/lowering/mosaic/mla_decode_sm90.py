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
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.mla_tiling import MlaTileConfig
from seekax.lowering.backend import interpret_context
from seekax.lowering.reference.mla_decode import combine_splits

CACHES = ("bf16", "fp8", "sparse", "sparse_fp8")
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _kernel(block_start_ref, n_blocks_ref, first_part_ref, split_offsets_ref, part_batches_ref, payload_ref,
            q_ref, *refs, config: MlaTileConfig, scale_log2: float, causal: bool, q_len: int, heads: int,
            in_place_acc: bool, cache: str):
    """q_ref [B, R, 576]; then the cache: kv_ref [pages, 64, 1, 576] (bf16), or for "fp8" latent_ref
    [pages, 64, 1, 512] e4m3, scales_ref [pages, 64, 1, 4] f32, rope_ref [pages, 64, 1, 64] bf16, or for
    "sparse" kv_ref [tokens, 576], or for "sparse_fp8" latent_ref [tokens, 512], scales_ref [B, max_tokens, 4]
    (gathered), rope_ref [tokens, 64]; then table_ref [B, max_pages] (sparse: [B, max_tokens] token ids);
    lens_ref [B]; out_ref [T, R, 512] f32 partials; lse_ref [T, R] f32 (natural log)."""
    fp8, sparse = cache in ("fp8", "sparse_fp8"), cache in ("sparse", "sparse_fp8")
    staged = fp8 or sparse                        # TMA fills staging slots, wg 1 writes the one bf16 tile
    if fp8:
        latent_ref, scales_ref, rope_ref, table_ref, lens_ref, out_ref, lse_ref = refs
        kv_ref = latent_ref
    else:
        kv_ref, table_ref, lens_ref, out_ref, lse_ref = refs
    bm, bn, stages, vh = config.block_m, config.block_n, config.stages, config.v_per_wg
    dtype = q_ref.dtype
    num_pages, max_pages = kv_ref.shape[0], table_ref.shape[1]         # sparse: tokens, ids per batch
    rt, part, wg = lax.axis_index("rt"), lax.axis_index("part"), lax.axis_index("wg")
    payload = payload_ref[0]
    b_begin, b_end = part_batches_ref[part, 0], part_batches_ref[part, 1]

    def block_range(b):
        start = block_start_ref[b]
        lo = jnp.maximum(part * payload, start) - start
        hi = jnp.minimum((part + 1) * payload, start + n_blocks_ref[b]) - start
        return lo, jnp.maximum(hi, lo)

    tiling, swizzle = plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)

    def scoped(q_smem, kv_smem, p_smem, a_smem, kv_ready, kv_consumed, q_bar, p_ready, p_free, *staging):
        """bf16: kv_smem [stages, 64, 576] holds the pages as TMA wrote them. fp8 / sparse: the TMA writes
        staging slots (fp8 latent + rope of a page / 64 gathered bf16 rows), wg 1 turns a slot into kv_smem
        [1, 64, 576] (bf16), which both compute warpgroups then read exactly as in the bf16 kernel;
        kv_ready/kv_consumed are then that tile's handshakes (wg 1 -> wg 0, wg 0 -> wg 1)."""
        if fp8:
            lat_smem, rope_smem, lat_ready, rope_ready, slot_free_bar = staging
            slot_ready = (lat_ready, rope_ready)
        elif sparse:
            rows_smem, rows_ready, slot_free_bar = staging
            slot_ready = (rows_ready,)
        kv_slots = 1 if staged else stages
        def pv(acc, alpha, slot, col: int):
            """acc * alpha + P V[:, this wg's channels]; in place on hardware, via a fresh accumulator when
            interpreting (the CPU interpreter does not run `run_state` over wgmma accumulators)."""
            v = kv_smem.at[slot, :, pl.ds(col, vh)]                           # [64 keys, vh], static columns
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            if in_place_acc:
                return pl.run_state(lambda r: plgpu.wgmma(r, p_smem, v))(plgpu.ACC.init(acc))

            def fresh(r):
                plgpu.wgmma(r, p_smem, v)
                plgpu.wgmma_wait(0)
                return r[...]
            return acc + pl.run_scoped(fresh, plgpu.ACC((bm, vh), jnp.float32))

        def zeros_acc():
            return plgpu.layout_cast(jnp.zeros((bm, vh), jnp.float32), plgpu.Layout.WGMMA)

        def row_vec(value):
            return plgpu.layout_cast(jnp.full((bm,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

        def split_row(b):
            return split_offsets_ref[b] + part - first_part_ref[b]

        def scrub_tail(slot, valid):
            """Zero the value rows at or past seq_len in a partial last page (garbage or NaN there would
            survive P = 0 as 0 x NaN in the P V wgmma). Runs before P is published to wg 1."""
            @pl.when(valid < bn)
            def _():
                key = plgpu.broadcasted_iota(jnp.int32, (bn, 64), 0, layout=plgpu.Layout.WGMMA)
                for c in range(config.v_dim // 64):
                    chunk = kv_smem.at[slot, :, pl.ds(c * 64, 64)]
                    vals = plgpu.load(chunk, layout=plgpu.Layout.WGMMA)
                    chunk[...] = jnp.where(key < valid, vals, jnp.zeros_like(vals))

        def page_of(b, j):
            return jnp.clip(table_ref[b, jnp.minimum(j, max_pages - 1)], 0, num_pages - 1)

        def fill_tile(b, j, step):
            """fp8 / sparse (wg 1): step j of batch b from its staging slot into kv_smem[0] as bf16 (fp8: latent
            x per-token scale per 128 channels, rope copied; sparse: the gathered rows copied); keys at or past
            the length become 0 (the scrub, folded in). Then the slot is free and the tile ready for wg 0."""
            slot = lax.rem(step, stages)

            @pl.when(step > 0)
            def _():
                plgpu.barrier_wait(kv_consumed.at[0])                 # wg 0 is done with the previous tile
            for bar in slot_ready:
                plgpu.barrier_wait(bar.at[slot])
            valid = lens_ref[b] - j * bn
            key64 = plgpu.broadcasted_iota(jnp.int32, (bn, 64), 0, layout=plgpu.Layout.WGMMA)
            if fp8:
                key = plgpu.broadcasted_iota(jnp.int32, (bn, 128), 0, layout=plgpu.Layout.WGMMA)
                keep = key < valid
                for g in range(config.v_dim // 128):
                    x = plgpu.load(lat_smem.at[slot, :, pl.ds(g * 128, 128)], layout=plgpu.Layout.WGMMA,
                                   optimized=not sparse)
                    row = scales_ref.at[b, pl.ds(j * bn, bn), g] if sparse else scales_ref.at[page_of(b, j), :, 0, g]
                    sc = plgpu.load(row, layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
                    y = x.astype(jnp.float32) * lax.broadcast_in_dim(sc, x.shape, [0])
                    y = jnp.where(keep, y, jnp.zeros_like(y)).astype(dtype)
                    for h in range(2):
                        kv_smem.at[0, :, pl.ds(g * 128 + h * 64, 64)][...] = y[:, h * 64:(h + 1) * 64]
                copied = [(rope_smem.at[slot, :, pl.ds(c * 64, 64)], config.v_dim + c * 64)
                          for c in range((config.qk_dim - config.v_dim) // 64)]
            else:
                copied = [(rows_smem.at[slot, :, pl.ds(c * 64, 64)], c * 64) for c in range(config.qk_dim // 64)]
            for src, col in copied:
                r = plgpu.load(src, layout=plgpu.Layout.WGMMA, optimized=not sparse)  # sparse: untiled slot
                kv_smem.at[0, :, pl.ds(col, 64)][...] = jnp.where(key64 < valid, r, jnp.zeros_like(r))
            plgpu.commit_smem()                                       # generic-proxy writes -> wgmma reads
            plgpu.barrier_arrive(slot_free_bar.at[slot])
            plgpu.barrier_arrive(kv_ready.at[0])

        @pl.when(wg == 0)
        def _softmax_wg():
            plgpu.set_max_registers(232, action="increase")

            def batch(b, carry):
                step, msgs = carry
                lo, hi = block_range(b)

                @pl.when(hi > lo)
                def _():
                    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(rt * bm, bm)], q_smem, q_bar.at[0])
                    plgpu.barrier_wait(q_bar.at[0])
                    seq_len = lens_ref[b]
                    # Per-row key limit as a row vector (a [64, 64] tensor would hold 32 more registers).
                    limit = plgpu.layout_cast(jnp.full((bm,), seq_len, jnp.int32), plgpu.Layout.WGMMA.reduce(1))
                    if causal and q_len > 1:  # query i = row // heads sees keys < seq_len - q_len + i + 1
                        rows = rt * bm + plgpu.broadcasted_iota(jnp.int32, (bm,), 0,
                                                                layout=plgpu.Layout.WGMMA.reduce(1))
                        limit = limit - (q_len - 1)
                        for i in range(1, q_len):
                            limit = limit + (rows >= i * heads).astype(jnp.int32)

                    def kv_step(j, c):
                        acc, m_i, l_i, step, msgs = c
                        slot = lax.rem(step, kv_slots)
                        plgpu.barrier_wait(kv_ready.at[slot])

                        def qk(r):
                            plgpu.wgmma(r, q_smem, kv_smem.at[slot].T)
                            plgpu.wgmma_wait(0)
                            return r[...]
                        s = pl.run_scoped(qk, plgpu.ACC((bm, bn), jnp.float32)) * scale_log2   # [64, 64]
                        cols = plgpu.broadcasted_iota(jnp.int32, (bm, bn), 1, layout=plgpu.Layout.WGMMA)
                        s = jnp.where(cols < lax.broadcast_in_dim(limit - j * bn, s.shape, [0]), s, -jnp.inf)
                        m_new = jnp.maximum(m_i, s.max(axis=1))
                        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)     # a row with nothing seen yet
                        alpha = jnp.exp2(m_i - m_safe)
                        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
                        l_i = l_i * alpha + p.sum(axis=1)
                        if not staged:                                 # staged: wg 1 zeroed the tail already
                            scrub_tail(slot, seq_len - j * bn)

                        @pl.when(msgs > 0)
                        def _():
                            plgpu.barrier_wait(p_free.at[0])                  # wg 1 is done with the last P
                        p_smem[...] = p.astype(dtype)
                        a_smem[...] = alpha
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(p_ready.at[0])
                        acc = pv(acc, alpha, slot, 0)
                        plgpu.barrier_arrive(kv_consumed.at[slot])
                        return acc, m_new, l_i, step + 1, msgs + 1

                    acc, m_i, l_i, _, msgs_in = lax.fori_loop(
                        lo, hi, kv_step, (zeros_acc(), row_vec(-jnp.inf), row_vec(0.0), step, msgs))
                    inv = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
                    plgpu.barrier_wait(p_free.at[0])
                    a_smem[...] = inv
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(p_ready.at[0])
                    t = split_row(b)
                    inv_b = lax.broadcast_in_dim(inv, acc.shape, [0])
                    out_ref.at[t, pl.ds(rt * bm, bm), pl.ds(0, vh)][...] = acc * inv_b
                    lse = jnp.where(l_i > 0, m_i * LN2 + jnp.log(jnp.where(l_i > 0, l_i, 1.0)), -jnp.inf)
                    lse_ref.at[t, pl.ds(rt * bm, bm)][...] = lse

                n = hi - lo
                return step + n, msgs + jnp.where(n > 0, n + 1, 0)

            _, msgs = lax.fori_loop(b_begin, b_end, batch, (jnp.int32(0), jnp.int32(0)))

            @pl.when(msgs > 0)
            def _():
                plgpu.barrier_wait(p_free.at[0])  # observe wg 1's last release before the barrier goes away

        @pl.when(wg == 1)
        def _value_wg():
            plgpu.set_max_registers(232, action="increase")

            def batch(b, step):
                lo, hi = block_range(b)

                @pl.when(hi > lo)
                def _():
                    def kv_step(j, c):
                        acc, step = c
                        if staged:
                            fill_tile(b, j, step)                     # fills and publishes the bf16 tile
                        slot = lax.rem(step, kv_slots)
                        plgpu.barrier_wait(p_ready.at[0])
                        alpha = plgpu.load(a_smem, layout=plgpu.Layout.WGMMA.reduce(1))
                        if not staged:                                # staged: this wg wrote the tile itself
                            plgpu.barrier_wait(kv_ready.at[slot])
                        acc = pv(acc, alpha, slot, vh)
                        plgpu.barrier_arrive(p_free.at[0])
                        if not staged:                                # staged: wg 0 alone releases the tile
                            plgpu.barrier_arrive(kv_consumed.at[slot])
                        return acc, step + 1

                    acc, _ = lax.fori_loop(lo, hi, kv_step, (zeros_acc(), step))
                    plgpu.barrier_wait(p_ready.at[0])
                    inv = plgpu.load(a_smem, layout=plgpu.Layout.WGMMA.reduce(1))
                    plgpu.barrier_arrive(p_free.at[0])
                    out_ref.at[split_row(b), pl.ds(rt * bm, bm), pl.ds(vh, vh)][...] = (
                        acc * lax.broadcast_in_dim(inv, acc.shape, [0]))

                return step + (hi - lo)

            steps = lax.fori_loop(b_begin, b_end, batch, jnp.int32(0))
            if staged:
                @pl.when(steps > 0)
                def _():
                    plgpu.barrier_wait(kv_consumed.at[0])  # observe wg 0's last release before the barrier goes away

        @pl.when(wg == 2)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")
            slot_free = slot_free_bar if staged else kv_consumed       # who releases a TMA slot

            def batch(b, step):
                lo, hi = block_range(b)

                def load(j, step):
                    slot = lax.rem(step, stages)

                    @pl.when(step >= stages)
                    def _():
                        plgpu.barrier_wait(slot_free.at[slot])
                    if sparse:  # one single-row TMA per token; ids past the length are 0 (one row, from L2)
                        @pl.loop(0, bn)
                        def _gather(r):
                            token = jnp.clip(table_ref[b, j * bn + r], 0, num_pages - 1)
                            if fp8:
                                plgpu.copy_gmem_to_smem(latent_ref.at[pl.ds(token, 1)], lat_smem.at[slot, pl.ds(r, 1)],
                                                        lat_ready.at[slot])
                                plgpu.copy_gmem_to_smem(rope_ref.at[pl.ds(token, 1)], rope_smem.at[slot, pl.ds(r, 1)],
                                                        rope_ready.at[slot])
                            else:
                                plgpu.copy_gmem_to_smem(kv_ref.at[pl.ds(token, 1)], rows_smem.at[slot, pl.ds(r, 1)],
                                                        rows_ready.at[slot])
                        return step + 1
                    page = page_of(b, j)
                    if fp8:
                        plgpu.copy_gmem_to_smem(latent_ref.at[page, :, 0, :], lat_smem.at[slot], lat_ready.at[slot])
                        plgpu.copy_gmem_to_smem(rope_ref.at[page, :, 0, :], rope_smem.at[slot], rope_ready.at[slot])
                    else:
                        plgpu.copy_gmem_to_smem(kv_ref.at[page, :, 0, :], kv_smem.at[slot], kv_ready.at[slot])
                    return step + 1

                return lax.fori_loop(lo, hi, load, step)

            steps = lax.fori_loop(b_begin, b_end, batch, jnp.int32(0))

            @pl.loop(jnp.maximum(steps - stages, 0), steps)
            def _drain(step):  # observe the last consumptions of every slot before the barriers go away
                plgpu.barrier_wait(slot_free.at[lax.rem(step, stages)])

    d = q_ref.shape[-1]
    if staged:  # TMA fills staging slots; the one bf16 tile is written by wg 1 and read by both compute wgs
        kv_tile = plgpu.SMEM((1, bn, d), dtype, transforms=(tiling, swizzle))
        kv_bars = (plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=1))  # tile ready (wg 1), free (wg 0)
    # sparse: untiled rows (a single-row TMA cannot write into an 8-row swizzled tile), one arrival per row copy
    arrivals = bn if sparse else 1
    if fp8:
        staging = (
            plgpu.SMEM((stages, bn, config.v_dim), latent_ref.dtype,
                       transforms=() if sparse else (plgpu.TilingTransform((8, 128)), swizzle)),
            plgpu.SMEM((stages, bn, d - config.v_dim), rope_ref.dtype, transforms=() if sparse else (tiling, swizzle)),
            plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
            plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        )
    elif sparse:
        staging = (plgpu.SMEM((stages, bn, d), kv_ref.dtype),
                   plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
                   plgpu.Barrier(num_barriers=stages))
    else:
        kv_tile = plgpu.SMEM((stages, bn, d), kv_ref.dtype, transforms=(tiling, swizzle))
        kv_bars = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=2, num_barriers=stages))
        staging = ()
    pl.run_scoped(
        scoped,
        plgpu.SMEM((bm, d), dtype, transforms=(tiling, swizzle)),
        kv_tile,
        plgpu.SMEM((bm, bn), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((bm,), jnp.float32),
        *kv_bars,
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=1),
        *staging,
        collective_axes="wg",
    )


def build(*, batch: int, rows: int, num_parts: int, max_splits: int, config: MlaTileConfig, scale: float,
          causal: bool, q_len: int, heads: int, in_place_acc: bool = True, cache: str = "bf16"):
    """The kernel callable f(metadata arrays..., q [B, rows, 576], kv_cache | (latent, scales, rope) | flat
    tokens, block_table | token table, seq_lens) -> (out partials [max_splits, rows, 512] f32, lse partials
    [max_splits, rows] f32). `cache`: one of CACHES."""
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}: expected one of {CACHES}")
    config.check_smem("float8_e4m3fn" if "fp8" in cache else "bfloat16", sparse=cache.startswith("sparse"))
    if rows % config.block_m:
        raise ValueError(f"rows={rows}: expected a multiple of block_m={config.block_m} (the wrapper pads)")
    body = functools.partial(_kernel, config=config, scale_log2=scale * LOG2E, causal=causal, q_len=q_len,
                             heads=heads, in_place_acc=in_place_acc, cache=cache)
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


def mla_decode(q, kv_cache, block_table, seq_lens, metadata, *, softmax_scale: float, causal: bool,
               config: MlaTileConfig, interpret: bool = False, sparse: bool = False):
    """Validated inputs (ops.mla.validate_mla_decode) -> out [B, q_len, H, 512] q.dtype, lse [B, H, q_len].
    `kv_cache`: the bf16 cache [pages, 64, 1, 576], or DeepSeek-V3.2's FP8 cache as a tuple (latent e4m3
    [pages, 64, 1, 512], scales f32 [pages, 64, 1, 4], rope bf16 [pages, 64, 1, 64]), validated by
    ops.mla.mla_decode_fp8; the kernel dequantises each page in shared memory. `sparse`: kv_cache is the
    flat bf16 cache [tokens, 576] or the flat FP8 cache (latent [tokens, 512], scales gathered per batch
    [B, max_tokens, 4], rope [tokens, 64]), block_table [B, max_tokens] token ids with the valid ones first
    and seq_lens [B] their count (ops.mla.mla_decode_sparse[_fp8] builds these, one "batch" per query)."""
    fp8 = isinstance(kv_cache, tuple)
    mode = ("sparse_fp8" if fp8 else "sparse") if sparse else ("fp8" if fp8 else "bf16")
    cache = kv_cache if fp8 else (kv_cache,)
    b, q_len, heads, d = q.shape
    rows = q_len * heads
    rows_p = -(-rows // config.block_m) * config.block_m
    qf = q.reshape(b, rows, d)                                                  # rows ordered (q_len, heads)
    if rows_p != rows:
        qf = jnp.pad(qf, ((0, 0), (0, rows_p - rows), (0, 0)))                 # [B, rows_p, 576]
    kernel = build(batch=b, rows=rows_p, num_parts=metadata.num_parts, max_splits=metadata.max_splits,
                   config=config, scale=softmax_scale, causal=causal, q_len=q_len, heads=heads,
                   in_place_acc=not interpret, cache=mode)
    ctx = interpret_context if interpret else contextlib.nullcontext  # a fresh context per kernel call
    with ctx():
        out_p, lse_p = kernel(metadata.block_start, metadata.n_blocks, metadata.first_part, metadata.split_offsets,
                              metadata.part_batches, metadata.payload, qf, *cache, block_table, seq_lens)
    if config.combine == "kernel":
        from seekax.lowering.mosaic import mla_combine_sm90

        with ctx():
            out, lse = mla_combine_sm90.combine(metadata.split_offsets, out_p, lse_p, out_dtype=q.dtype)
        out = out[:, :rows].reshape(b, q_len, heads, config.v_dim)                 # [B, q_len, H, 512]
        return out, jnp.transpose(lse[:, :rows].reshape(b, q_len, heads), (0, 2, 1))  # [B, H, q_len]
    t = metadata.max_splits
    out_p = out_p[:, :rows].reshape(t, q_len, heads, config.v_dim)              # [T, q_len, H, 512]
    lse_p = jnp.transpose(lse_p[:, :rows].reshape(t, q_len, heads), (0, 2, 1))  # [T, H, q_len]
    return combine_splits(out_p, lse_p, metadata.split_offsets, out_dtype=q.dtype)
