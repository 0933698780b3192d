"""Small-M (decode) dense FP8 NT GEMM for Hopper, in Pallas Mosaic GPU: the "swap AB" form of `fp8_gemm_sm90`.

out[M, N] = sum_kb (A[:, kb] @ B[:, kb]^T) * a_scale[:, kb] * b_scale[n // 128, kb] for M of 1..64 tokens.

wgmma's M side is 64 rows; with A on that side a handful of tokens pads to a 64-row activation tile that every
CTA loads per K block next to a B tile a quarter of its size. Here the kernel computes out^T = B A^T instead:
- each compute warpgroup owns `block_rows` (64) rows of B, wgmma's M side; the tokens (rounded up to 8) are
  its N side, so a K block moves [cta_rows, 128] bytes of B and only [tokens, 128] of A;
- warp-specialised TMA pipeline over 128-wide K blocks (`pipeline_common.k_pipeline`): the B rows, the token
  tile and the tokens' a_scale row, with the dense kernel's K-tail rule (`fp8_gemm_sm90.k_swizzle`);
- promotion per K block: main += acc * (b_scale * a_scale[token]): b_scale one scalar per warpgroup (its 64
  rows lie in one 128-row block), a_scale a per-column vector of the transposed tile;
- epilogue: the [rows, tokens] fp32 tile is converted to the transposed WGMMA register layout (a shuffle
  within pairs of lanes), stored through a transposed view of a [tokens, rows] SMEM tile, and TMA-stored
  as out[tokens, rows]: the output comes out in its own layout, with no pass after the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.fp8_tiling import FP8_BLOCK_K, SCALE_BLOCK, Fp8SwapAbConfig
from seekax.lowering.mosaic.fp8_gemm_sm90 import (k_swizzle, operand_transforms, pad_rows, padded_k,
                                                  tma_aligned_scales)
from seekax.lowering.mosaic.pipeline_common import (k_pipeline, k_row_spec, k_tile_spec, persistent_kernel,
                                                    pipeline_allocations, swizzled)


def _kernel(a_gmem, sa_gmem, b_gmem, sb_gmem, out_gmem, *, config: Fp8SwapAbConfig, swizzle: int):
    """a_gmem [Mp, K] e4m3 (tokens, Mp a multiple of block_tokens); sa_gmem [Kb, Mp] f32 (token-major);
    b_gmem [N, K] e4m3; sb_gmem [Nb, Kb] f32; out_gmem [Mp, N]."""
    mp, k = a_gmem.shape
    n = b_gmem.shape[0]
    rows, tokens, cta_rows = config.block_rows, config.block_tokens, config.cta_rows
    t_iters, n_iters, k_iters = mp // tokens, n // cta_rows, -(-k // FP8_BLOCK_K)
    tf = operand_transforms(swizzle)
    pipeline = k_pipeline(in_specs=[k_tile_spec(cta_rows, FP8_BLOCK_K, tf), k_tile_spec(tokens, FP8_BLOCK_K, tf),
                                    k_row_spec(tokens)],
                          k_iters=k_iters, num_compute_wgs=config.num_compute_wgs, stages=config.stages)
    out_dtype = out_gmem.dtype

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline_allocations(pipeline, b_gmem, a_gmem, sa_gmem),
        out_smem=plgpu.SMEM((config.num_compute_wgs, tokens, rows), out_dtype,
                            transforms=swizzled(out_dtype, rows)),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((t_iters * n_iters,), collective_axes="sm")
        def _tile_loop(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            ti, ni = plgpu.planar_snake(lin, (t_iters, n_iters), 1, config.grid_tile_width)
            row0 = ni * cta_rows + wg * rows                  # this warpgroup's first B row (output column)
            n_block = row0 // SCALE_BLOCK                     # its 128-row b_scale block
            token_slice = pl.ds(ti * tokens, tokens)
            wg_rows = pl.ds(wg * rows, rows)

            def compute_context(run_pipeline):
                acc_t = run_pipeline(jnp.zeros((rows, tokens), jnp.float32))      # [rows, tokens] = out^T tile
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)                     # the previous tile's store
                tile = plgpu.layout_cast(acc_t.astype(out_dtype), plgpu.Layout.WGMMA_TRANSPOSED)
                out_smem.at[wg].transpose((1, 0))[...] = tile                        # SMEM holds [tokens, rows]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[token_slice, pl.ds(row0, rows)])

            def body(idx, b_smem, a_smem, sa_smem, carry):
                (ki,) = idx

                def block_mma(acc_ref):
                    plgpu.wgmma(acc_ref, b_smem.at[wg_rows], a_smem.T)    # B [rows, 128], A^T [128, tokens]
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                acc = pl.run_scoped(block_mma, plgpu.ACC((rows, tokens), jnp.float32))   # [rows, tokens]
                sa = sa_smem[0, :]                                                         # [tokens]
                return carry + acc * (sa * sb_gmem[n_block, ki])[None, :]

            pipeline(body, compute_context)(b_gmem.at[pl.ds(ni * cta_rows, cta_rows), :], a_gmem.at[token_slice, :],
                                            sa_gmem.at[:, token_slice], allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def check_problem(spec, config: Fp8SwapAbConfig) -> None:
    """Shapes this kernel handles (valid input outside them raises NotImplementedError)."""
    if spec.accumulate or tuple(spec.b_scale) != (SCALE_BLOCK, SCALE_BLOCK):
        raise NotImplementedError("the small-M FP8 kernel takes 128 x 128 B scales and no c (use an "
                                  f"Fp8TileConfig for this call; got {config})")
    if spec.n % config.cta_rows:
        raise NotImplementedError(f"n={spec.n}: the small-M FP8 kernel needs a multiple of "
                                  f"cta_rows={config.cta_rows} ({config})")
    if spec.m == 0:
        raise NotImplementedError("m=0: nothing to launch")
    k_swizzle(padded_k(spec.k))


def build(spec, config: Fp8SwapAbConfig, num_sms: int):
    """f(a [M, K], a_scale [M, Kb], b [N, K], b_scale [Nb, Kb]) -> [M, N]. Tokens are padded to a multiple of
    block_tokens (a few rows of A and a_scale), K below 128 to 128."""
    check_problem(spec, config)
    m, n, k = spec.m, spec.n, spec.k
    out_dtype = jnp.dtype(spec.out_dtype)
    config.check_smem(out_dtype.itemsize)
    mp, kp = -(-m // config.block_tokens) * config.block_tokens, padded_k(k)
    tiles = (mp // config.block_tokens) * (n // config.cta_rows)
    kernel = persistent_kernel(
        functools.partial(_kernel, config=config, swizzle=k_swizzle(kp)), jax.ShapeDtypeStruct((mp, n), out_dtype),
        num_compute_wgs=config.num_compute_wgs, num_sms=num_sms, tiles=tiles)

    def run(a, a_scale, b, b_scale):
        a, a_scale = pad_rows(pad_rows(a, kp, -1), mp), pad_rows(a_scale, mp)
        out = kernel(a, tma_aligned_scales(a_scale), pad_rows(b, kp, -1), b_scale)
        return out[:m] if mp != m else out

    return run
