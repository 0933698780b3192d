"""Dense FP8 NT GEMM with DeepGEMM's fine-grained scaling for Hopper, in Pallas Mosaic GPU.

out[M, N] = c + sum_kb (A[:, kb] @ B[:, kb]^T) * a_scale[:, kb] * b_scale[., kb], kb over 128-wide K blocks,
b_scale per (128, 128) block of B (forward, dgrad) or per (1, 128) row slice of B (weight gradient
dW = dY^T X, both operands scaled per token); c (optional, float32) is accumulated into.

Structure (`matmul_sm90.py`'s warp-specialised pipeline plus scale promotion):
- persistent grid: one CTA per SM walks output tiles in a planar snake;
- warp-specialised TMA pipeline: one memory warpgroup streams, per 128-wide K block, the e4m3 A tile
  [cta_m, 128], the e4m3 B tile [cta_n, 128] (K-major) and the a_scale row slice [cta_m] (with per-row B
  scales also the b_scale slice [cta_n]) into `stages` slots;
- each compute warpgroup issues FP8 wgmma (both operands K-major) into a fresh fp32 accumulator for one
  K block, then promotes: main += block_acc * (a_scale[row] * b_scale) in registers (DeepGEMM's fix for
  the tensor cores' limited FP8 accumulation precision);
- epilogue through shared memory, stored with TMA; with c, each chunk of c is TMA-loaded into the chunk's
  SMEM slot and added in registers before the store.
M tails: the last row tile reaches past M; TMA zero-fills those rows on load and drops them on store.
K tails: Mosaic describes a TMA transfer as (8, swizzle)-tiles of the whole array, so the shared-memory tiles
use the widest swizzle (128, 64 or 32 bytes) that divides K; the last K block's columns past K are then
whole out-of-bounds tiles, zero-filled by TMA, and its scale block covers the columns that exist.
Padding in the wrapper: M to a multiple of 8 rows (the tile height) and at least one CTA tile, K below 128
to 128 (a TMA box may not be larger than its array).
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.fp8 import ACT_BLOCK
from seekax.ir.fp8_tiling import FP8_BLOCK_K, SCALE_BLOCK, Fp8SwapAbConfig, Fp8TileConfig
from seekax.ir.tiling import WgSplit
from seekax.lowering.mosaic.gemm_common import c_barriers_spec, epilogue_smem, store_tile, tile_slices
from seekax.lowering.mosaic.pipeline_common import (k_pipeline, k_row_spec, k_tile_spec, persistent_kernel,
                                                    pipeline_allocations)

_FP8 = jnp.float8_e4m3fn
TILE_ROWS = 8        # rows of one TMA / wgmma shared-memory tile: the row count of a tiled GMEM array divides it


def k_swizzle(k: int) -> int:
    """The e4m3 tiles' swizzle in bytes for a K-major array of K columns: the widest of 128, 64, 32 dividing K
    (one element is one byte). NotImplementedError for other K (wgmma has no 16-byte swizzle for FP8)."""
    for swizzle in (128, 64, 32):
        if k % swizzle == 0:
            return swizzle
    raise NotImplementedError(f"k={k}: the FP8 kernels need a multiple of 32 (their TMA tiles are 32, 64 or "
                              "128 bytes wide)")


def operand_transforms(swizzle: int = 128):
    """e4m3 tiles: (8, swizzle) tiling + swizzle, as wgmma reads them (128-byte rows when K divides by 128)."""
    return plgpu.TilingTransform((TILE_ROWS, swizzle)), plgpu.SwizzleTransform(swizzle)


def fp8_pipeline(config: Fp8TileConfig, k_iters: int, *, col_scales: bool = False, swizzle: int = 128):
    """The FP8 kernels' K-block pipeline (`pipeline_common.k_pipeline`): per 128-wide K block, the e4m3 A tile
    [cta_m, 128], the e4m3 B tile [cta_n, 128] and the a_scale row [cta_m]; with `col_scales` also a b_scale
    row [cta_n] (per-row scales of B: the k-grouped kernel, the dense weight gradient)."""
    tf = operand_transforms(swizzle)
    specs = [k_tile_spec(config.cta_block_m, FP8_BLOCK_K, tf), k_tile_spec(config.cta_block_n, FP8_BLOCK_K, tf),
             k_row_spec(config.cta_block_m)]
    if col_scales:
        specs.append(k_row_spec(config.cta_block_n))
    return k_pipeline(in_specs=specs, k_iters=k_iters, num_compute_wgs=config.num_compute_wgs, stages=config.stages)


def tma_aligned_scales(a_scale):
    """a_scale [..., M, Kb] -> [..., Kb, round_up(M, 4)]: M-major, so one K block's row scales are one TMA
    row, with rows padded to 16 bytes (TMA needs 16-byte global strides; DeepGEMM does the same)."""
    m = a_scale.shape[-2]
    pad = [(0, 0)] * (a_scale.ndim - 2) + [(0, -m % 4), (0, 0)]
    return jnp.swapaxes(jnp.pad(a_scale, pad), -1, -2)


def promote_step(a_smem, b_smem, sa_smem, b_scale, carry, *, wg_m, wg_n, block_m, block_n):
    """One 128-wide K block: fp32 wgmma of the e4m3 tiles, then carry + acc * (a_scale[row] * b_scale), with
    b_scale one scalar (a 128 x 128 block of B) or a [block_n] vector (one scale per row of B)."""

    def block_mma(acc_ref):
        plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[wg_n].T)   # A [bm, 128], B^T [128, bn]: both K-major
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    acc = pl.run_scoped(block_mma, plgpu.ACC((block_m, block_n), jnp.float32))   # [bm, bn]
    sa = sa_smem[0, wg_m]                                                            # [bm] a_scale of these rows
    if jnp.ndim(b_scale) == 0:
        return carry + acc * (sa * b_scale)[:, None]
    return carry + acc * sa[:, None] * b_scale[None, :]


def _kernel(a_gmem, sa_gmem, b_gmem, sb_gmem, *rest, config: Fp8TileConfig, col_scales: bool, swizzle: int):
    """a_gmem [M, K] e4m3; sa_gmem [Kb, M4] f32 (M-major, M4 = M rounded up to 4); b_gmem [N, K] e4m3;
    sb_gmem [Nb, Kb] f32 (128 x 128 blocks) or [Kb, N] (col_scales: per row of B, N-major);
    rest: (c_gmem [M, N] f32, out_gmem [M, N]) when accumulating, else (out_gmem,)."""
    *c, out_gmem = rest
    c_gmem = c[0] if c else None
    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    bm, bn = config.block_m, config.block_n
    cta_m, cta_n = config.cta_block_m, config.cta_block_n
    m_iters, n_iters, k_iters = -(-m // cta_m), n // cta_n, -(-k // FP8_BLOCK_K)
    pipeline = fp8_pipeline(config, k_iters, col_scales=col_scales, swizzle=swizzle)
    operands = (a_gmem, b_gmem, sa_gmem) + ((sb_gmem,) if col_scales else ())
    scratch = {"c_barriers": c_barriers_spec(config)} if c_gmem is not None else {}

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline_allocations(pipeline, *operands),
        out_smem=epilogue_smem(config, out_gmem.dtype),
        collective_axes="wg",
        **scratch,
    )
    def _scope(pipeline_allocs, out_smem, c_barriers=None):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            cta_m_slice, cta_n_slice, wg_m, wg_n, ni = tile_slices(lin, wg, config, m_iters, n_iters)
            n0 = ni * cta_n + (wg * bn if config.wg_split == WgSplit.N else 0)
            n_block = n0 // SCALE_BLOCK    # block_n divides 128: one b_scale row per warpgroup tile

            def compute_context(run_pipeline):
                acc = run_pipeline(jnp.zeros((bm, bn), jnp.float32))
                c_tile = None if c_gmem is None else c_gmem.at[cta_m_slice, cta_n_slice].at[wg_m, wg_n]
                store_tile(acc, out_smem, out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m, wg_n],
                           wg=wg, epi_n=config.epi_block_n, c_gmem_tile=c_tile, c_barriers=c_barriers)

            def block_body(idx, a_smem, b_smem, sa_smem, carry):
                (ki,) = idx
                return promote_step(a_smem, b_smem, sa_smem, sb_gmem[n_block, ki], carry,
                                    wg_m=wg_m, wg_n=wg_n, block_m=bm, block_n=bn)

            def row_body(idx, a_smem, b_smem, sa_smem, sb_smem, carry):
                return promote_step(a_smem, b_smem, sa_smem, sb_smem[0, wg_n], carry,
                                    wg_m=wg_m, wg_n=wg_n, block_m=bm, block_n=bn)

            tiles = (a_gmem.at[cta_m_slice, :], b_gmem.at[cta_n_slice, :], sa_gmem.at[:, cta_m_slice])
            tiles += (sb_gmem.at[:, cta_n_slice],) if col_scales else ()
            pipeline(row_body if col_scales else block_body, compute_context)(*tiles, allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def check_problem(m: int, n: int, k: int, config: Fp8TileConfig) -> None:
    """Shapes this kernel handles (valid input outside them raises NotImplementedError: the xla path runs)."""
    if n % config.cta_block_n:
        raise NotImplementedError(f"n={n}: the FP8 kernel needs a multiple of cta_block_n={config.cta_block_n} "
                                  f"({config})")
    if m == 0:
        raise NotImplementedError("m=0: nothing to launch")
    k_swizzle(padded_k(k))


def padded_m(m: int, config: Fp8TileConfig) -> int:
    """Rows the kernel sees: M rounded up to a multiple of 8 (Mosaic tiles the whole GMEM array in 8-row tiles)
    and to at least one CTA tile (a TMA box may not be larger than its array)."""
    return max(-(-m // TILE_ROWS) * TILE_ROWS, config.cta_block_m)


def padded_k(k: int) -> int:
    """Columns the kernel sees: K itself, or one 128-wide block when K is smaller (TMA boxes must fit)."""
    return max(k, FP8_BLOCK_K)


def pad_rows(x, rows: int, axis: int = -2):
    """x zero-padded along `axis` to `rows` (a no-op when it has them)."""
    extra = rows - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def build(spec, config: Fp8TileConfig | Fp8SwapAbConfig, num_sms: int):
    """f(a [M, K], a_scale [M, Kb], b [N, K], b_scale [Nb, Kb] or [N, Kb], c [M, N] f32 | None) -> [M, N].

    spec.b_scale picks B's scale granularity ((128, 128) blocks or (1, 128) rows), spec.accumulate whether c
    is added. An `Fp8SwapAbConfig` builds the small-M kernel (`fp8_gemm_swapab_sm90`) instead. Checks shapes and
    the shared-memory budget before tracing the kernel.
    """
    if isinstance(config, Fp8SwapAbConfig):
        from seekax.lowering.mosaic import fp8_gemm_swapab_sm90

        return fp8_gemm_swapab_sm90.build(spec, config, num_sms)
    m, n, k = spec.m, spec.n, spec.k
    check_problem(m, n, k, config)
    col_scales = tuple(spec.b_scale) == ACT_BLOCK
    out_dtype = jnp.dtype(spec.out_dtype)
    config.check_smem(out_dtype.itemsize, col_scales=col_scales)
    mp, kp = padded_m(m, config), padded_k(k)
    tiles = -(-mp // config.cta_block_m) * (n // config.cta_block_n)
    kernel = persistent_kernel(
        functools.partial(_kernel, config=config, col_scales=col_scales, swizzle=k_swizzle(kp)),
        jax.ShapeDtypeStruct((mp, n), out_dtype), num_compute_wgs=config.num_compute_wgs, num_sms=num_sms,
        tiles=tiles)

    def run(a, a_scale, b, b_scale, c=None):
        a, a_scale = pad_rows(pad_rows(a, kp, -1), mp), pad_rows(a_scale, mp)
        b = pad_rows(b, kp, -1)
        sb = tma_aligned_scales(b_scale) if col_scales else b_scale
        extra = () if c is None else (pad_rows(c, mp),)
        out = kernel(a, tma_aligned_scales(a_scale), b, sb, *extra)
        return out[:m] if mp != m else out

    return run
