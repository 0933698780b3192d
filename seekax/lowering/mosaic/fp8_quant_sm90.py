"""Per-token (1, 128) FP8 quantisation for Hopper in Pallas Mosaic GPU.

x [M, K] (K a multiple of 128) -> x_fp8 [M, K] e4m3 and scale [M, K/128] f32, scale = max(amax, 1e-4) / 448,
exactly the oracle's numbers. One CTA per [64, 128] block: TMA load into SMEM, row amax in registers
(WGMMA layout, so the row reduction is a warp shuffle), scale and cast, TMA stores of the e4m3 block and of
the 64 scales (written M-major, [K/128, M4], so they form one TMA row; transposed back by the wrapper).
Many small CTAs per SM hide the memory latency instead of a software pipeline.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from seekax.ir.fp8 import AMAX_FLOOR, FP8_MAX
from seekax.ir.fp8 import SCALE_BLOCK as BLOCK_K   # the quantisation group

BLOCK_M = 64       # rows per CTA: one warpgroup's WGMMA-layout tile


def _kernel(x_gmem, q_gmem, s_gmem, x_smem, q_smem, s_smem, barrier):
    """x_gmem [M, K]; q_gmem [M, K] e4m3; s_gmem [K/128, M4] f32."""
    mi, ki = lax.axis_index("m"), lax.axis_index("k")
    rows, cols = pl.ds(mi * BLOCK_M, BLOCK_M), pl.ds(ki * BLOCK_K, BLOCK_K)
    plgpu.copy_gmem_to_smem(x_gmem.at[rows, cols], x_smem, barrier)
    plgpu.barrier_wait(barrier)
    x = plgpu.layout_cast(x_smem[...], plgpu.Layout.WGMMA).astype(jnp.float32)   # [64, 128]
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=1), AMAX_FLOOR) / FP8_MAX          # [64]
    q_smem[...] = jnp.clip(x / scale[:, None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    s_smem[0, :] = scale
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, q_gmem.at[rows, cols])             # rows past M are dropped by TMA
    plgpu.copy_smem_to_gmem(s_smem, s_gmem.at[pl.ds(ki, 1), rows])
    plgpu.wait_smem_to_gmem(0)


def build(m: int, k: int, dtype):
    """f(x [M, K]) -> (x_fp8 [M, K], scale [M, K/128]). K must be a multiple of 128."""
    if k % BLOCK_K or k == 0:
        raise NotImplementedError(f"k={k}: the quantisation kernel needs a positive multiple of {BLOCK_K}")
    if m == 0:
        raise NotImplementedError("m=0: nothing to launch")
    if jnp.dtype(dtype).name not in ("bfloat16", "float16", "float32"):
        raise NotImplementedError(f"dtype={dtype}: bfloat16, float16 or float32")
    mp = max(m, BLOCK_M)                   # a TMA box may not exceed its array
    m4 = -(-mp // 4) * 4                   # 16-byte rows for the M-major scales
    kb = k // BLOCK_K
    kernel = plgpu.kernel(
        _kernel,
        out_type=(jax.ShapeDtypeStruct((mp, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((kb, m4), jnp.float32)),
        grid=(-(-mp // BLOCK_M), kb), grid_names=("m", "k"),
        scratch_types=[plgpu.SMEM((BLOCK_M, BLOCK_K), dtype), plgpu.SMEM((BLOCK_M, BLOCK_K), jnp.float8_e4m3fn),
                       plgpu.SMEM((1, BLOCK_M), jnp.float32), plgpu.Barrier()],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )

    def run(x):
        if mp != m:
            x = jnp.pad(x, ((0, mp - m), (0, 0)))
        q, s = kernel(x)
        return q[:m], s[:, :m].T

    return run
