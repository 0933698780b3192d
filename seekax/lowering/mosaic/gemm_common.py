"""Pieces every Hopper GEMM kernel here shares: output-tile placement on the persistent grid and the
SMEM + TMA epilogue. (The bf16 template `matmul_sm90` and the FP8 kernels use the same ones; their K-block
pipeline is set up by `pipeline_common`.)"""

from __future__ import annotations

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from seekax.ir.tiling import WgSplit
from seekax.lowering.mosaic.pipeline_common import swizzled

EPI_M = 64      # epilogue rows per TMA store: one warpgroup's WGMMA-layout tile


def out_transforms(epi_n: int, out_dtype):
    """Epilogue tile transforms: (8, swizzle) tiling and the widest swizzle one epi_n-wide row allows."""
    return swizzled(out_dtype, epi_n)


def epilogue_smem(config, out_dtype) -> plgpu.SMEM:
    """`store_tile`'s buffers: per compute warpgroup, two [64, epi_block_n] slots (one filling while the other's
    TMA store drains)."""
    return plgpu.SMEM((config.num_compute_wgs, 2, EPI_M, config.epi_block_n), out_dtype,
                      transforms=out_transforms(config.epi_block_n, out_dtype))


def store_tile(acc, out_smem, out_gmem_tile, *, wg, epi_n: int, c_gmem_tile=None, c_barriers=None):
    """Write a [bm, bn] fp32 register tile through double-buffered SMEM slots with TMA stores.

    With `c_gmem_tile` (a [bm, bn] window of c, the output's dtype) the stored tile is c + acc: each [64, epi_n]
    chunk of c is TMA-loaded into the slot the chunk will leave from (the next chunk's load overlapping this
    chunk's add and store) and added in registers, so no pass over the output follows the kernel. `c_barriers`:
    2 TMA barriers per compute warpgroup (`c_barriers_spec`)."""
    bm, bn = acc.shape
    epi_m = EPI_M
    acc = acc.astype(out_smem.dtype)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    chunks = []
    for e in range((bm // epi_m) * (bn // epi_n)):
        ei, ej = divmod(e, bn // epi_n)
        chunks.append((slice(ei * epi_m, (ei + 1) * epi_m), slice(ej * epi_n, (ej + 1) * epi_n)))
    if c_gmem_tile is None:
        for e, (rows, cols) in enumerate(chunks):
            slot = e % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the slot's previous store has been read
            out_smem[wg, slot] = acc[rows, cols]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem_tile.at[rows, cols])
        return

    def load_c(e):
        rows, cols = chunks[e]
        plgpu.copy_gmem_to_smem(c_gmem_tile.at[rows, cols], out_smem.at[wg, e % 2], c_barriers.at[wg * 2 + e % 2])

    load_c(0)
    for e, (rows, cols) in enumerate(chunks):
        slot = e % 2
        if e + 1 < len(chunks):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # chunk e - 1's store has read the other slot
            load_c(e + 1)
        plgpu.barrier_wait(c_barriers.at[wg * 2 + slot])
        out_smem[wg, slot] = acc[rows, cols] + out_smem[wg, slot]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem_tile.at[rows, cols])


def c_barriers_spec(config) -> plgpu.Barrier:
    """The TMA barriers `store_tile` waits on while it loads c: two per compute warpgroup (one per slot)."""
    return plgpu.Barrier(num_barriers=2 * config.num_compute_wgs)


def tile_slices(lin, wg, config, m_iters: int, n_iters: int):
    """Output tile `lin` of the persistent loop (planar snake order) -> (cta_m_slice, cta_n_slice, wg_m, wg_n,
    ni): the CTA's rows and columns, this warpgroup's part of them (split along config.wg_split), and the
    tile's column index."""
    mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, config.grid_tile_width)
    cta_m, cta_n = config.cta_block_m, config.cta_block_n
    cta_m_slice, cta_n_slice = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
    if config.wg_split == WgSplit.M:
        return cta_m_slice, cta_n_slice, pl.ds(wg * config.block_m, config.block_m), slice(None), ni
    return cta_m_slice, cta_n_slice, slice(None), pl.ds(wg * config.block_n, config.block_n), ni
