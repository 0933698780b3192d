"""bf16/f16 NT matmul for Hopper in Pallas Mosaic GPU: the template the FP8 GEMMs build on.

Structure: a persistent grid (one CTA per SM walks output tiles in a planar snake), a warp-specialized
TMA pipeline (one memory warpgroup feeds `stages` shared-memory slots), two compute warpgroups issuing
wgmma into fp32 register accumulators, and an epilogue through shared memory stored with TMA.
B is K-major ([N, K]) and fed to wgmma transposed, which is the layout FP8 wgmma requires.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.tiling import GemmTileConfig
from seekax.lowering.mosaic.gemm_common import epilogue_smem, store_tile, tile_slices
from seekax.lowering.mosaic.pipeline_common import (k_pipeline, k_tile_spec, persistent_kernel, pipeline_allocations,
                                                    swizzled)


def _kernel(a_gmem, b_gmem, out_gmem, *, config: GemmTileConfig):
    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    cta_m, cta_n = config.cta_block_m, config.cta_block_n
    epi_n = config.epi_block_n
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // bk
    tiles = swizzled(a_gmem.dtype, bk)                        # [rows, bk] operand tiles, as wgmma reads them
    pipeline = k_pipeline(in_specs=[k_tile_spec(cta_m, bk, tiles), k_tile_spec(cta_n, bk, tiles)], k_iters=k_iters,
                          num_compute_wgs=config.num_compute_wgs, stages=config.stages)

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline_allocations(pipeline, a_gmem, b_gmem),
        out_smem=epilogue_smem(config, out_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            cta_m_slice, cta_n_slice, wg_m, wg_n, _ = tile_slices(lin, wg, config, m_iters, n_iters)

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
                def _acc(acc_ref):
                    run_pipeline(acc_ref)
                    store_tile(acc_ref[...], out_smem, out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m, wg_n],
                               wg=wg, epi_n=epi_n)

            def mma(_, a_smem, b_smem, acc_ref):
                # a_smem: [cta_m, bk]; b_smem: [cta_n, bk] K-major, fed to wgmma as [bk, bn].
                plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[wg_n].T)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, compute_context)(a_gmem.at[cta_m_slice, :], b_gmem.at[cta_n_slice, :],
                                           allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def check_problem(m: int, n: int, k: int, config: GemmTileConfig) -> None:
    """Shapes this kernel handles: every dimension a multiple of the CTA tile (no masked tails here). Valid input
    outside them raises NotImplementedError (backend "auto" then runs the XLA reference)."""
    if m % config.cta_block_m or m == 0:
        raise NotImplementedError(f"m={m}: the matmul kernel needs a positive multiple of the CTA tile's "
                                  f"{config.cta_block_m} rows ({config})")
    if n % config.cta_block_n:
        raise NotImplementedError(f"n={n}: the matmul kernel needs a multiple of the CTA tile's "
                                  f"{config.cta_block_n} columns ({config})")
    if k % config.block_k:
        raise NotImplementedError(f"k={k}: the matmul kernel needs a multiple of block_k={config.block_k}")


def build(m: int, n: int, k: int, dtype, out_dtype, config: GemmTileConfig, num_sms: int):
    """The pallas kernel callable f(a [M, K], b [N, K]) -> [M, N]. Validates shapes and shared memory first."""
    if jnp.dtype(dtype).name not in ("bfloat16", "float16"):
        raise NotImplementedError(f"dtype={jnp.dtype(dtype).name}: the matmul kernel takes bfloat16 or float16 "
                                  "(FP8: seekax.ops.fp8)")
    check_problem(m, n, k, config)
    config.check_smem(jnp.dtype(dtype).name, jnp.dtype(out_dtype).name)
    return persistent_kernel(functools.partial(_kernel, config=config), jax.ShapeDtypeStruct((m, n), out_dtype),
                             num_compute_wgs=config.num_compute_wgs, num_sms=num_sms)
