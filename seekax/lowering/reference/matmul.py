"""Plain-JAX oracle for the NT matmul: out[m, n] = sum_k a[m, k] * b[n, k], float32 accumulation."""

from __future__ import annotations

import jax.numpy as jnp


def matmul_nt(a, b, *, out_dtype=None):
    """a: [M, K], b: [N, K] (K-major, the layout FP8 wgmma requires) -> [M, N] in out_dtype (default a.dtype)."""
    out_dtype = a.dtype if out_dtype is None else out_dtype
    acc = jnp.einsum("mk,nk->mn", a.astype(jnp.float32), b.astype(jnp.float32))  # [M, N] f32
    return acc.astype(out_dtype)
