"""The end-to-end demo. Until every part exists it tours what does: a Mosaic GPU kernel run on the CPU
interpreter and checked against XLA, and the same kernel cross-lowered for Hopper."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def main(args) -> int:
    from seekax.lowering.inspect import lower_for_hopper
    from seekax.runtime.matmul import matmul_nt
    from seekax.testing import interpret_mode, rel_err
    from seekax.ir.tiling import GemmTileConfig

    print(f"seekax demo on {len(jax.devices())} {jax.devices()[0].platform} device(s)")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((256, 256)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((256, 256)), jnp.bfloat16)
    cfg = GemmTileConfig(block_m=64, block_n=64, block_k=64, stages=2)
    with interpret_mode():
        out = matmul_nt(a, b, config=cfg, backend="interpret", num_sms=4).block_until_ready()
    ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    print(f"bf16 matmul 256^3 on the Mosaic GPU interpreter: rel_err vs float64 = {rel_err(out, ref):.2e}")
    s = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    report = lower_for_hopper(functools.partial(matmul_nt, backend="mosaic"), s, s).reports[0]
    print(f"cross-lowered 4096^3 for sm_90a: {report.summary()}")
    return 0
