"""K-grouped FP8 GEMM for MoE weight gradients on Hopper (DeepGEMM's k-grouped wgrad), Pallas Mosaic GPU.

out[g] = A_g^T @ B_g, where A = dY [T, M] and B = X [T, N] hold every expert's tokens stacked (groups of
multiples of 128 tokens), both with one scale per 128 tokens per column.

FP8 wgmma wants the contraction (tokens) K-major, so the wrapper transposes the operands to [M, T], [N, T].
Each output tile then runs ONE static pipeline over all T/128 token blocks: a token block belongs to exactly
one group, so the fp32 accumulator is promoted per block (acc * a_scale[m] * b_scale[n], both per-column
vectors), stored to out[g] after a group's last block, and reset. Per-block group ids and "last block"
flags are precomputed by XLA and read as GMEM scalars. Groups with no tokens are zeroed by the wrapper.
With c (accumulating weight gradients across micro-batches) each flush stores c[g] + acc: the store loads c's
tile chunk by chunk into the epilogue slots and adds it in registers (`gemm_common.store_tile`); a group with
no tokens gets c[g] from the wrapper's select, no add.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.fp8_tiling import FP8_BLOCK_K, Fp8TileConfig
from seekax.lowering.mosaic.fp8_gemm_sm90 import fp8_pipeline
from seekax.lowering.mosaic.fp8_gemm_sm90 import pad_rows, padded_m
from seekax.lowering.mosaic.gemm_common import c_barriers_spec, epilogue_smem, store_tile, tile_slices
from seekax.lowering.mosaic.pipeline_common import persistent_kernel, pipeline_allocations


def _kernel(grp_gmem, last_gmem, a_gmem, sa_gmem, b_gmem, sb_gmem, *rest, config: Fp8TileConfig):
    """grp/last [Tb] i32; a_gmem [M, T] e4m3; sa_gmem [Tb, M4] f32; b_gmem [N, T]; sb_gmem [Tb, N4];
    rest: (c [G, M, N] f32, out [G, M, N]) when accumulating, else (out,)."""
    *c, out_gmem = rest
    c_gmem = c[0] if c else None
    m, t = a_gmem.shape
    n = b_gmem.shape[0]
    bm, bn, cta_m, cta_n = config.block_m, config.block_n, config.cta_block_m, config.cta_block_n
    m_iters, n_iters, k_iters = -(-m // cta_m), n // cta_n, t // FP8_BLOCK_K
    pipeline = fp8_pipeline(config, k_iters, col_scales=True)

    scratch = {"c_barriers": c_barriers_spec(config)} if c_gmem is not None else {}

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline_allocations(pipeline, a_gmem, b_gmem, sa_gmem, sb_gmem),
        out_smem=epilogue_smem(config, out_gmem.dtype),
        collective_axes="wg",
        **scratch,
    )
    def _scope(pipeline_allocs, out_smem, c_barriers=None):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            cta_m_slice, cta_n_slice, wg_m, wg_n, _ = tile_slices(lin, wg, config, m_iters, n_iters)

            def compute_context(run_pipeline):
                run_pipeline(jnp.zeros((bm, bn), jnp.float32))   # every group's tile is stored inside

            def body(idx, a_smem, b_smem, sa_smem, sb_smem, carry):
                (ki,) = idx
                group, last = grp_gmem[ki], last_gmem[ki]

                def block_mma(acc_ref):
                    plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[wg_n].T)   # [bm, 128] x [128, bn], K-major
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                acc = pl.run_scoped(block_mma, plgpu.ACC((bm, bn), jnp.float32))   # [bm, bn]
                sa = sa_smem[0, wg_m]                                                # [bm] per-row scales
                sb = sb_smem[0, wg_n]                                                # [bn] per-column scales
                carry = carry + acc * sa[:, None] * sb[None, :]

                @pl.when(last != 0)
                def _flush():
                    c_tile = (None if c_gmem is None
                              else c_gmem.at[group].at[cta_m_slice, cta_n_slice].at[wg_m, wg_n])
                    store_tile(carry, out_smem, out_gmem.at[group].at[cta_m_slice, cta_n_slice].at[wg_m, wg_n],
                               wg=wg, epi_n=config.epi_block_n, c_gmem_tile=c_tile, c_barriers=c_barriers)

                flush = lax.broadcast_in_dim(last != 0, carry.shape, ())
                return jnp.where(flush, jnp.zeros_like(carry), carry)   # the next group starts from 0

            pipeline(body, compute_context)(a_gmem.at[cta_m_slice, :], b_gmem.at[cta_n_slice, :],
                                            sa_gmem.at[:, cta_m_slice], sb_gmem.at[:, cta_n_slice],
                                            allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _pad_cols(x, multiple: int, at_least: int = 0):
    c = x.shape[-1]
    target = max(-(-c // multiple) * multiple, at_least)
    return jnp.pad(x, ((0, 0), (0, target - c))) if target != c else x


def build(spec, config: Fp8TileConfig, num_sms: int):
    """f(a [T, M], a_scale [T/128, M], b [T, N], b_scale [T/128, N], group_sizes_k [G], c [G, M, N] | None)
    -> [G, M, N]."""
    g, m, n, t = spec.num_groups, spec.m, spec.n, spec.k
    if n % config.cta_block_n:
        raise NotImplementedError(f"n={n}: the k-grouped FP8 kernel needs a multiple of "
                                  f"cta_block_n={config.cta_block_n}")
    if t == 0 or m == 0:
        raise NotImplementedError("no tokens or no rows: nothing to launch")
    out_dtype = jnp.dtype(spec.out_dtype)
    config.check_smem(out_dtype.itemsize, col_scales=True)
    mp = padded_m(m, config)
    tiles = -(-mp // config.cta_block_m) * (n // config.cta_block_n)
    kernel = persistent_kernel(
        functools.partial(_kernel, config=config),
        jax.ShapeDtypeStruct((g, mp, n), out_dtype), num_compute_wgs=config.num_compute_wgs, num_sms=num_sms,
        tiles=tiles)

    def run(a, a_scale, b, b_scale, group_sizes_k, c=None):
        tb = t // FP8_BLOCK_K
        blocks = jnp.maximum(group_sizes_k.astype(jnp.int32), 0) // FP8_BLOCK_K     # [G]
        ends = jnp.cumsum(blocks)                                                      # [G]
        kb = jnp.arange(tb, dtype=jnp.int32)                                           # [Tb]
        grp = jnp.minimum(jnp.searchsorted(ends, kb, side="right"), g - 1).astype(jnp.int32)  # [Tb]
        last = (kb + 1 == ends[grp]).astype(jnp.int32)                                 # [Tb]
        at = pad_rows(a.T, mp)                                                         # [Mp, T] K-major
        extra = () if c is None else (pad_rows(c, mp),)                                # [G, Mp, N]
        out = kernel(grp, last, at, _pad_cols(a_scale, 4, mp), b.T, _pad_cols(b_scale, 4), *extra)[:, :m]
        empty = jnp.zeros((), out.dtype) if c is None else c                           # an empty group's output
        return jnp.where((blocks > 0)[:, None, None], out, empty)                      # [G, M, N]

    return run
