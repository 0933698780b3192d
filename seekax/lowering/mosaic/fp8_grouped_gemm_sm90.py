"""MoE-grouped FP8 NT GEMMs for Hopper in Pallas Mosaic GPU (DeepGEMM's m-grouped contiguous and masked).

Both reuse the dense kernel's pieces (`fp8_gemm_sm90`: warp-specialised TMA pipeline over 128-wide K
blocks, e4m3 wgmma, per-block scale promotion) and differ in how output tiles map to groups:
- contiguous: a [M, K], each group's rows one run [start_g, end_g) (from group sizes, or from a per-row
  group id with -1 padding rows between groups). Tiles walk "virtual row blocks": group g covers the row
  blocks its rows touch, so a block straddling two groups is computed once per group and each pass
  stores only its own rows, with a ladder of power-of-two TMA stores (rows 64, 32, ..., 1) out of an
  unswizzled SMEM tile. Group bounds are read from GMEM scalars, as ragged_dot_mgpu does. Blocks holding only
  padding rows are never visited; a padding row inside a visited block is loaded with its tile but only
  reaches its own output row, which is not stored.
- masked: a [G, M_max, K] fixed buffers; tiles whose first row is >= masked_m[g] are skipped.
M tails: TMA zero-fills rows past the array on load and drops them on store; K tails as in the dense kernel
(`fp8_gemm_sm90`: the widest swizzle dividing K, the last block's missing columns zero-filled). The wrapper
pads only M to a multiple of 8 rows and one CTA tile, and K below 128.
Rows no group owns (padding, or >= masked_m[g]) are not written by the kernel; the wrapper zeroes them with
one fused select so the public contract (zeros) holds.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.fp8_tiling import FP8_BLOCK_K, SCALE_BLOCK, SMEM_HEADROOM, SMEM_LIMIT_BYTES, Fp8TileConfig
from seekax.ir.tiling import WgSplit
from seekax.lowering.mosaic.fp8_gemm_sm90 import (fp8_pipeline, k_swizzle, pad_rows, padded_k, padded_m,
                                                  promote_step, tma_aligned_scales)
from seekax.lowering.mosaic.gemm_common import epilogue_smem, store_tile
from seekax.lowering.mosaic.pipeline_common import persistent_kernel, pipeline_allocations


def _wg_slices(config: Fp8TileConfig, wg, ni):
    """(rows of this warpgroup in the CTA tile, its columns, its first output column)."""
    bm, bn, cta_n = config.block_m, config.block_n, config.cta_block_n
    if config.wg_split == WgSplit.M:
        return pl.ds(wg * bm, bm), slice(None), ni * cta_n
    return slice(None), pl.ds(wg * bn, bn), ni * cta_n + wg * bn


def _group_of_block(bounds_gmem, num_groups: int, tile_m: int, v):
    """Virtual row block v -> (group, first row of the block, rows [lo, hi) of the group in it, valid).

    Group g with rows [start, end) (bounds_gmem[0, g], bounds_gmem[1, g]) covers row blocks start//T ..
    (end-1)//T (none if empty); virtual blocks enumerate those ranges group after group. Unrolled over groups
    (scalar GMEM reads)."""
    zero = jnp.int32(0)
    offset = group = blk = lo = hi = zero
    found = jnp.bool_(False)
    for g in range(num_groups):
        start, end = bounds_gmem[0, g], bounds_gmem[1, g]
        first = lax.div(start, jnp.int32(tile_m))
        count = jnp.where(end > start, lax.div(end - 1, jnp.int32(tile_m)) - first + 1, zero)
        mine = (v >= offset) & (v < offset + count)
        b = first + (v - offset)
        group = jnp.where(mine, jnp.int32(g), group)
        blk = jnp.where(mine, b, blk)
        lo = jnp.where(mine, start, lo)
        hi = jnp.where(mine, end, hi)
        found = found | mine
        offset = offset + count
    return group, blk * tile_m, lo, hi, found


def group_bounds(group_sizes=None, m_indices=None, *, num_groups: int, m: int):
    """[2, G] int32: each group's rows [start, end), from group sizes (consecutive runs from row 0) or from
    per-row group ids (the first and one past the last row of each id; -1 rows belong to none). An empty
    group gets start == end."""
    if m_indices is None:
        sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)                         # [G]
        ends = jnp.cumsum(sizes)                                                       # [G]
        return jnp.stack([ends - sizes, ends])                                         # [2, G]
    ids = m_indices.astype(jnp.int32)                                                  # [M]
    ids = jnp.where(ids >= 0, ids, num_groups)                                         # [M] padding: out of range
    rows = jnp.arange(m, dtype=jnp.int32)                                              # [M]
    starts = jnp.full((num_groups,), m, jnp.int32).at[ids].min(rows, mode="drop")     # [G]
    ends = jnp.zeros((num_groups,), jnp.int32).at[ids].max(rows + 1, mode="drop")     # [G]
    return jnp.stack([starts, jnp.maximum(ends, starts)])                              # [2, G]


def _ladder_store(smem, gmem_rows, s, length, max_rows: int):
    """Store rows [s, s + length) of `smem` ([max_rows, C], unswizzled) to the same rows of `gmem_rows`
    with at most log2(max_rows) + 1 TMA copies of power-of-two heights (static shapes, dynamic offsets)."""
    p = max_rows
    while p >= 1:
        @pl.when((length & p) != 0)
        def _store(p=p, s=s):
            plgpu.copy_smem_to_gmem(smem.at[pl.ds(s, p)], gmem_rows.at[pl.ds(s, p)])

        s = s + (length & p)
        p //= 2


def _contiguous_kernel(bounds_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem, *, config: Fp8TileConfig,
                       num_groups: int, row_blocks: int):
    """bounds_gmem [2, G] i32 (`group_bounds`); a_gmem [M, K]; sa_gmem [Kb, M4]; b_gmem [G, N, K];
    sb_gmem [G, Nb, Kb]; out_gmem [M, N] (M >= cta_m)."""
    k = a_gmem.shape[1]
    n = b_gmem.shape[1]
    bm, bn, cta_m, cta_n = config.block_m, config.block_n, config.cta_block_m, config.cta_block_n
    n_iters, k_iters = n // cta_n, -(-k // FP8_BLOCK_K)
    pipeline = fp8_pipeline(config, k_iters, swizzle=k_swizzle(k))

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline_allocations(pipeline, a_gmem, b_gmem.at[0], sa_gmem),
        out_smem=plgpu.SMEM((config.num_compute_wgs, bm, bn), out_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((row_blocks * n_iters,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            v, ni = plgpu.planar_snake(lin, (row_blocks, n_iters), 1, config.grid_tile_width)
            group, row0, lo, hi, active = _group_of_block(bounds_gmem, num_groups, cta_m, v)
            wg_m, wg_n, n0 = _wg_slices(config, wg, ni)
            n_block = n0 // SCALE_BLOCK
            wg_row0 = row0 + (wg * bm if config.wg_split == WgSplit.M else 0)
            cols = pl.ds(ni * cta_n, cta_n)

            def compute_context(run_pipeline):
                acc = run_pipeline(jnp.zeros((bm, bn), jnp.float32))      # [bm, bn]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)           # previous tile's stores read
                out_smem[wg] = acc.astype(out_smem.dtype)
                plgpu.commit_smem()
                s = jnp.clip(lo - wg_row0, 0, bm)
                e = jnp.clip(hi - wg_row0, 0, bm)
                _ladder_store(out_smem.at[wg], out_gmem.at[pl.ds(wg_row0, bm), cols].at[:, wg_n], s,
                              jnp.maximum(e - s, 0), bm)

            def body(idx, a_smem, b_smem, sa_smem, carry):
                (ki,) = idx
                return promote_step(a_smem, b_smem, sa_smem, sb_gmem[group, n_block, ki], carry,
                                    wg_m=wg_m, wg_n=wg_n, block_m=bm, block_n=bn)

            @pl.when(active)
            def _run():
                rows = pl.ds(row0, cta_m)
                pipeline(body, compute_context)(a_gmem.at[rows, :], b_gmem.at[group, cols, :], sa_gmem.at[:, rows],
                                                allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _masked_kernel(masked_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem, *, config: Fp8TileConfig,
                   num_groups: int, m_pad: int):
    """a_gmem [G, Mp, K]; sa_gmem [G, Kb, Mp4]; b_gmem [G, N, K]; sb_gmem [G, Nb, Kb]; out_gmem [G, Mp, N].
    Each group is its own TMA box range, so a row tile reaching past Mp is clipped within its group."""
    k = a_gmem.shape[2]
    n = b_gmem.shape[1]
    bm, bn, cta_m, cta_n = config.block_m, config.block_n, config.cta_block_m, config.cta_block_n
    m_iters, n_iters, k_iters = -(-m_pad // cta_m), n // cta_n, -(-k // FP8_BLOCK_K)
    pipeline = fp8_pipeline(config, k_iters, swizzle=k_swizzle(k))

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline_allocations(pipeline, a_gmem.at[0], b_gmem.at[0], sa_gmem.at[0]),
        out_smem=epilogue_smem(config, out_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((num_groups * m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            gm, ni = plgpu.planar_snake(lin, (num_groups * m_iters, n_iters), 1, config.grid_tile_width)
            group, mi = lax.div(gm, jnp.int32(m_iters)), lax.rem(gm, jnp.int32(m_iters))
            wg_m, wg_n, n0 = _wg_slices(config, wg, ni)
            n_block = n0 // SCALE_BLOCK
            rows = pl.ds(mi * cta_m, cta_m)
            cols = pl.ds(ni * cta_n, cta_n)

            def compute_context(run_pipeline):
                acc = run_pipeline(jnp.zeros((bm, bn), jnp.float32))
                store_tile(acc, out_smem, out_gmem.at[group].at[rows, cols].at[wg_m, wg_n], wg=wg,
                           epi_n=config.epi_block_n)

            def body(idx, a_smem, b_smem, sa_smem, carry):
                (ki,) = idx
                return promote_step(a_smem, b_smem, sa_smem, sb_gmem[group, n_block, ki], carry,
                                    wg_m=wg_m, wg_n=wg_n, block_m=bm, block_n=bn)

            @pl.when(mi * cta_m < masked_gmem[group])
            def _run():
                pipeline(body, compute_context)(a_gmem.at[group].at[rows, :], b_gmem.at[group, cols, :],
                                                sa_gmem.at[group].at[:, rows], allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def check_problem(n: int, k: int, config: Fp8TileConfig) -> None:
    if n % config.cta_block_n:
        raise NotImplementedError(f"n={n}: the FP8 grouped kernel needs a multiple of cta_block_n={config.cta_block_n}")
    k_swizzle(padded_k(k))


def contiguous_kernel(spec, config: Fp8TileConfig, num_sms: int):
    """The contiguous kernel itself: f(bounds [2, G], a [Mp, Kp], a_scale M-major [Kb, Mp4], b [G, N, Kp],
    b_scale [G, Nb, Kb]) -> [Mp, N] with Mp = `padded_m`, Kp = `padded_k`; rows no group owns are left
    unwritten. Checks the shapes and shared memory first."""
    g, m, n, k = spec.num_groups, spec.m, spec.n, spec.k
    check_problem(n, k, config)
    if m == 0:
        raise NotImplementedError("m=0: nothing to launch")
    out_dtype = jnp.dtype(spec.out_dtype)
    if config.block_n * out_dtype.itemsize < 128:
        raise NotImplementedError(f"block_n={config.block_n}: the contiguous kernel's row-wise TMA stores need "
                                  f"output rows of >= 128 bytes ({config})")
    # the epilogue is one unswizzled [block_m, block_n] tile per warpgroup; Mosaic adds the group bounds and a
    # few small buffers on top of the model (SMEM_HEADROOM)
    config.check_smem(out_dtype.itemsize, limit=SMEM_LIMIT_BYTES - SMEM_HEADROOM, tile_epilogue=True)
    cta_m = config.cta_block_m
    mp = padded_m(m, config)
    row_blocks = -(-mp // cta_m) + g - 1          # a bound on the virtual row blocks over all groups
    tiles = row_blocks * (n // config.cta_block_n)
    return persistent_kernel(
        functools.partial(_contiguous_kernel, config=config, num_groups=g, row_blocks=row_blocks),
        jax.ShapeDtypeStruct((mp, n), out_dtype), num_compute_wgs=config.num_compute_wgs, num_sms=num_sms,
        tiles=tiles)


def build_contiguous(spec, config: Fp8TileConfig, num_sms: int, *, by_row: bool = False):
    """f(a [M, K], a_scale [M, Kb], b [G, N, K], b_scale [G, Nb, Kb], groups) -> [M, N], where groups is
    group_sizes [G] or, with `by_row`, m_indices [M] (-1: a padding row)."""
    g, m = spec.num_groups, spec.m
    kernel = contiguous_kernel(spec, config, num_sms)
    mp, kp = padded_m(m, config), padded_k(spec.k)

    def run(a, a_scale, b, b_scale, groups):
        a, a_scale = pad_rows(pad_rows(a, kp, -1), mp), pad_rows(a_scale, mp)
        b = pad_rows(b, kp, -1)
        bounds = group_bounds(None if by_row else groups, groups if by_row else None, num_groups=g, m=m)  # [2, G]
        out = kernel(bounds, a, tma_aligned_scales(a_scale), b, b_scale)[:m]                            # [M, N]
        if by_row:
            owned = groups.astype(jnp.int32) >= 0                                                       # [M]
        else:
            owned = jnp.arange(m, dtype=jnp.int32) < bounds[1, -1]                                      # [M]
        return jnp.where(owned[:, None], out, jnp.zeros((), out.dtype))

    return run


def build_masked(spec, config: Fp8TileConfig, num_sms: int):
    """f(a [G, M_max, K], a_scale [G, M_max, Kb], b [G, N, K], b_scale [G, Nb, Kb], masked_m [G]) -> [G, M_max, N]."""
    g, m_max, n, k = spec.num_groups, spec.m, spec.n, spec.k
    check_problem(n, k, config)
    if m_max == 0:
        raise NotImplementedError("M_max=0: nothing to launch")
    out_dtype = jnp.dtype(spec.out_dtype)
    config.check_smem(out_dtype.itemsize)
    cta_m = config.cta_block_m
    mp, kp = padded_m(m_max, config), padded_k(k)
    tiles = g * -(-mp // cta_m) * (n // config.cta_block_n)
    kernel = persistent_kernel(
        functools.partial(_masked_kernel, config=config, num_groups=g, m_pad=mp),
        jax.ShapeDtypeStruct((g, mp, n), out_dtype), num_compute_wgs=config.num_compute_wgs, num_sms=num_sms,
        tiles=tiles)

    def run(a, a_scale, b, b_scale, masked_m):
        a, a_scale = pad_rows(pad_rows(a, kp, -1), mp), pad_rows(a_scale, mp)
        b = pad_rows(b, kp, -1)
        masked = masked_m.astype(jnp.int32)
        out = kernel(masked, a, tma_aligned_scales(a_scale), b, b_scale)[:, :m_max]  # [G, M_max, N]
        keep = jnp.arange(m_max, dtype=jnp.int32)[None, :] < masked[:, None]    # [G, M_max]
        return jnp.where(keep[..., None], out, jnp.zeros((), out.dtype))

    return run
