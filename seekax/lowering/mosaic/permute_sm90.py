"""Row gather for the MoE local permute on Hopper (Pallas Mosaic GPU): out[i] = x[src[i]], zero rows where
src[i] is out of range (the permutation's sentinel).

Each CTA owns a [block_rows, block_h] output tile: it reads its row indices as GMEM scalars, issues one
TMA row copy per output row into shared memory (from x, or from a one-row zero buffer for sentinels, so
the tile's barrier sees exactly one arrival a row), waits, and stores the tile with one TMA copy. A gather is
memory bound: the point is one pass over the bytes with no scatter, as DeepEP's permute kernels do.
The XLA path (`seekax.lowering.dispatch_permute.permute`) is the reference and the fallback.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.validate import check_int, fail


@dataclasses.dataclass(frozen=True, kw_only=True)
class PermuteConfig:
    """block_rows output rows and block_h columns per CTA (tile rows of block_h * itemsize, a multiple of 128 B)."""

    block_rows: int = 64
    block_h: int = 128

    def __post_init__(self):
        check_int("block_rows", self.block_rows, min_value=1)
        check_int("block_h", self.block_h, min_value=8, multiple_of=8)
        if self.block_h > 256:
            raise fail("block_h", self.block_h, "<= 256 (a TMA box dimension)")


def _kernel(src_gmem, x_gmem, zero_gmem, out_gmem, tile, barrier, *, config: PermuteConfig):
    br, bh = config.block_rows, config.block_h
    rows = x_gmem.shape[0]
    bi, hi = lax.axis_index("rows"), lax.axis_index("cols")
    cols = pl.ds(hi * bh, bh)

    # Unrolled over the tile's rows; one barrier expects block_rows arrivals (one copy a row).
    for j in range(br):
        r = src_gmem[bi * br + j]
        valid = (r >= 0) & (r < rows)
        dst, bar = tile.at[pl.ds(j, 1)], barrier
        # Branches, not `predicate=`: the CPU interpreter mis-parses predicated copies (JAX 0.11.2).
        pl.when(valid)(functools.partial(plgpu.copy_gmem_to_smem, x_gmem.at[pl.ds(jnp.where(valid, r, 0), 1), cols],
                                         dst, bar))
        pl.when(jnp.logical_not(valid))(functools.partial(plgpu.copy_gmem_to_smem,
                                                          zero_gmem.at[pl.ds(0, 1), pl.ds(0, bh)], dst, bar))
    plgpu.barrier_wait(barrier)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tile, out_gmem.at[pl.ds(bi * br, br), cols])
    plgpu.wait_smem_to_gmem(0)


def build(m: int, rows: int, h: int, dtype, config: PermuteConfig):
    """A function (src [m] int32, x [rows, h]) -> [m, h]. m is padded up to block_rows internally."""
    br, bh = config.block_rows, min(config.block_h, h)
    if h % bh or (bh * jnp.dtype(dtype).itemsize) % 128:
        # Each row lands at a 128-byte aligned shared-memory address (the safe TMA destination alignment).
        raise NotImplementedError(f"hidden={h}: the Mosaic permute needs hidden a multiple of block_h={bh} "
                                  "with 128-byte tile rows")
    cfg = dataclasses.replace(config, block_h=bh)
    mp = -(-m // br) * br
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=cfg),
        out_type=jax.ShapeDtypeStruct((mp, h), dtype),
        grid=(mp // br, h // bh), grid_names=("rows", "cols"),
        scratch_types=dict(tile=plgpu.SMEM((br, bh), dtype),
                            barrier=plgpu.Barrier(num_arrivals=br)),
    )

    def run(src, x):
        src = jnp.pad(src.astype(jnp.int32), (0, mp - m), constant_values=rows)
        out = kernel(src, x, jnp.zeros((1, bh), dtype))
        return out[:m]

    return run
