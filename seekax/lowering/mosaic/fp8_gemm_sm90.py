"""Dense FP8 NT GEMM with DeepGEMM's fine-grained scaling for Hopper, in Pallas Mosaic GPU.

out[M, N] = sum_kb (A[:, kb] @ B[:, kb]^T) * a_scale[:, kb] * b_scale[n // 128, kb], kb over 128-wide K blocks.

Structure (`matmul_sm90.py`'s warp-specialised pipeline plus scale promotion):
- persistent grid: one CTA per SM walks output tiles in a planar snake;
- warp-specialised TMA pipeline: one memory warpgroup streams, per 128-wide K block, the e4m3 A tile
  [cta_m, 128], the e4m3 B tile [cta_n, 128] (K-major) and the a_scale row slice [cta_m] into `stages` slots;
- each compute warpgroup issues FP8 wgmma (both operands K-major) into a fresh fp32 accumulator for one
  K block, then promotes: main += block_acc * (a_scale[row] * b_scale) in registers (DeepGEMM's fix for
  the tensor cores' limited FP8 accumulation precision);
- epilogue through shared memory, stored with TMA.
M tails: the last row tile reaches past M; TMA zero-fills those rows on load and drops them on store
(only an M smaller than one CTA tile is padded, since a TMA box may not be larger than its array).
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.fp8_tiling import FP8_BLOCK_K, SCALE_BLOCK, Fp8TileConfig
from seekax.ir.tiling import WgSplit
from seekax.lowering.mosaic.gemm_common import epilogue_smem, store_tile, tile_slices
from seekax.lowering.mosaic.pipeline_common import (WARPGROUP_PARAMS, k_pipeline, k_row_spec, k_tile_spec,
                                                    pipeline_allocations, swizzled)

_FP8 = jnp.float8_e4m3fn


def operand_transforms():
    """e4m3 tiles of 128 bytes per row: (8, 128) tiling + 128-byte swizzle, as wgmma reads them."""
    return swizzled(_FP8, FP8_BLOCK_K)


def fp8_pipeline(config: Fp8TileConfig, k_iters: int, *, col_scales: bool = False):
    """The FP8 kernels' K-block pipeline (`pipeline_common.k_pipeline`): per 128-wide K block, the e4m3 A tile
    [cta_m, 128], the e4m3 B tile [cta_n, 128] and the a_scale row [cta_m]; with `col_scales` also a b_scale
    row [cta_n] (the k-grouped kernel's per-column scales)."""
    tf = operand_transforms()
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
    """One 128-wide K block: fp32 wgmma of the e4m3 tiles, then carry + acc * (a_scale[row] * b_scale)."""

    def block_mma(acc_ref):
        plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[wg_n].T)   # A [bm, 128], B^T [128, bn]: both K-major
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    acc = pl.run_scoped(block_mma, plgpu.ACC((block_m, block_n), jnp.float32))   # [bm, bn]
    sa = sa_smem[0, wg_m]                                                            # [bm] a_scale of these rows
    return carry + acc * (sa * b_scale)[:, None]


def _kernel(a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem, *, config: Fp8TileConfig):
    """a_gmem [M, K] e4m3; sa_gmem [Kb, M4] f32 (M-major, M4 = M rounded up to 4); b_gmem [N, K] e4m3;
    sb_gmem [Nb, Kb] f32."""
    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    bm, bn = config.block_m, config.block_n
    cta_m, cta_n = config.cta_block_m, config.cta_block_n
    m_iters, n_iters, k_iters = -(-m // cta_m), n // cta_n, k // FP8_BLOCK_K
    pipeline = fp8_pipeline(config, k_iters)

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline_allocations(pipeline, a_gmem, b_gmem, sa_gmem),
        out_smem=epilogue_smem(config, out_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            cta_m_slice, cta_n_slice, wg_m, wg_n, ni = tile_slices(lin, wg, config, m_iters, n_iters)
            n0 = ni * cta_n + (wg * bn if config.wg_split == WgSplit.N else 0)
            n_block = n0 // SCALE_BLOCK    # block_n divides 128: one b_scale row per warpgroup tile

            def compute_context(run_pipeline):
                acc = run_pipeline(jnp.zeros((bm, bn), jnp.float32))
                store_tile(acc, out_smem, out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m, wg_n],
                           wg=wg, epi_n=config.epi_block_n)

            def body(idx, a_smem, b_smem, sa_smem, carry):
                (ki,) = idx
                return promote_step(a_smem, b_smem, sa_smem, sb_gmem[n_block, ki], carry,
                                    wg_m=wg_m, wg_n=wg_n, block_m=bm, block_n=bn)

            pipeline(body, compute_context)(a_gmem.at[cta_m_slice, :], b_gmem.at[cta_n_slice, :],
                                            sa_gmem.at[:, cta_m_slice], allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def check_problem(m: int, n: int, k: int, config: Fp8TileConfig) -> None:
    """Shapes this kernel handles (valid input outside them raises NotImplementedError: the xla path runs)."""
    if n % config.cta_block_n:
        raise NotImplementedError(f"n={n}: the FP8 kernel needs a multiple of cta_block_n={config.cta_block_n} "
                                  f"({config})")
    if k % FP8_BLOCK_K:
        raise NotImplementedError(f"k={k}: the FP8 kernel needs a multiple of {FP8_BLOCK_K} (quantize_fp8 pads K)")
    if m == 0:
        raise NotImplementedError("m=0: nothing to launch")


def padded_m(m: int, config: Fp8TileConfig) -> int:
    """Rows the kernel sees: M itself, or one CTA tile when M is smaller (TMA boxes must fit the array)."""
    return max(m, config.cta_block_m)


def build(spec, config: Fp8TileConfig, num_sms: int):
    """f(a [M, K], a_scale [M, Kb], b [N, K], b_scale [Nb, Kb]) -> [M, N] running the Mosaic kernel.

    Checks shapes and the shared-memory budget before tracing the kernel.
    """
    m, n, k = spec.m, spec.n, spec.k
    check_problem(m, n, k, config)
    out_dtype = jnp.dtype(spec.out_dtype)
    config.check_smem(out_dtype.itemsize)
    mp = padded_m(m, config)
    tiles = -(-mp // config.cta_block_m) * (n // config.cta_block_n)
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config),
        out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(min(num_sms, tiles),),
        grid_names=("sm",),
        num_threads=config.num_compute_wgs + 1,
        thread_name="wg",
        compiler_params=WARPGROUP_PARAMS,
    )

    def run(a, a_scale, b, b_scale):
        if mp != m:
            a = jnp.pad(a, ((0, mp - m), (0, 0)))
            a_scale = jnp.pad(a_scale, ((0, mp - m), (0, 0)))
        out = kernel(a, tma_aligned_scales(a_scale), b, b_scale)
        return out[:m] if mp != m else out

    return run


