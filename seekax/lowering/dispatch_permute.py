"""Local permute/unpermute around the grouped GEMM (XLA path): received copies -> rows sorted by expert.

After a normal-mode dispatch each received row carries up to K local expert ids. `permute` expands every
(row, k) pair with a local expert into its own row, grouped by expert ascending (stable: received order,
then k), each group padded up to `alignment` rows (DeepGEMM's contiguous layout wants M-aligned groups);
`unpermute` gathers the expert outputs back and sums them per received row, weighted by the top-k weights.
Both are gathers; `permute` also runs as a Mosaic GPU row-gather kernel (`mosaic/permute_sm90.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from seekax.ir.validate import fail
from seekax.lowering.backend import run_kernel, run_op
from seekax.lowering.dispatch_route import exclusive_cumsum, take0


@dataclasses.dataclass(frozen=True)
class Permutation:
    """src_row [M]: received row feeding each permuted row (R = padding); pair_row [R, K]: permuted row of
    each (received row, k) pair (M = none); group_sizes [G]: rows per expert (aligned)."""

    src_row: jax.Array
    pair_row: jax.Array
    group_sizes: jax.Array


jax.tree_util.register_dataclass(Permutation, data_fields=["src_row", "pair_row", "group_sizes"], meta_fields=[])


def permuted_rows(recv_rows: int, top_k: int, num_local_experts: int, alignment: int = 1) -> int:
    """Static bound on permuted rows: every pair once, plus the worst-case alignment padding."""
    pairs = recv_rows * min(top_k, num_local_experts)
    return max(pairs + num_local_experts * (alignment - 1), 1)


def make_permutation(local_idx: jax.Array, num_local_experts: int, alignment: int = 1) -> Permutation:
    """local_idx: [R, K] local expert ids (-1 = not here) -> Permutation."""
    r, k = local_idx.shape
    g = num_local_experts
    m = permuted_rows(r, k, g, alignment)
    e = jnp.where(local_idx >= 0, local_idx, g).reshape(-1)                     # [R*K]
    onehot = e[:, None] == jnp.arange(g)                                         # [R*K, G]
    rank = jnp.cumsum(onehot, 0, dtype=jnp.int32)[jnp.arange(r * k), jnp.minimum(e, g - 1)] - 1
    counts = onehot.sum(0, dtype=jnp.int32)                                      # [G]
    sizes = -(-counts // alignment) * alignment                                  # [G]
    start = exclusive_cumsum(sizes)                                              # [G]
    pair_row = jnp.where(e < g, start[jnp.minimum(e, g - 1)] + rank, m)          # [R*K]
    src = jnp.full((m,), r, jnp.int32).at[pair_row].set(jnp.arange(r * k, dtype=jnp.int32) // k, mode="drop")
    return Permutation(src_row=src, pair_row=pair_row.reshape(r, k).astype(jnp.int32), group_sizes=sizes)


def validate_permute(x, perm: Permutation) -> None:
    """The one validation point of `permute` (every backend): one row of x per received row of the plan."""
    rows = perm.pair_row.shape[0]
    if getattr(x, "ndim", 0) < 1 or x.shape[0] != rows:
        raise fail("x.shape", tuple(getattr(x, "shape", ())) or None,
                   f"[R={rows}, ...] (one row per received row of the permutation)")


def permute(x: jax.Array, perm: Permutation, *, backend: str = "xla") -> jax.Array:
    """x: [R, ...] received rows -> [M, ...] rows grouped by local expert (padding rows are zero).

    backend: "xla" (a gather), "mosaic" / "interpret" (the Hopper row-gather kernel, `permute_sm90`, for
    x [R, H] with 128-byte tile rows), "auto" (the kernel on Hopper when it takes the shape, else xla).
    Differentiable: the VJP is the unweighted unpermute (a gather too, no scatter)."""
    validate_permute(x, perm)
    return run_op(backend, kernel=lambda resolved: _permute_kernel_entry(x, perm, resolved),
                  reference=lambda: take0(x, perm.src_row), name="permute")


def _permute_kernel_entry(x, perm: Permutation, backend: str) -> jax.Array:
    if x.ndim != 2:
        raise NotImplementedError(f"x.shape={tuple(x.shape)}: the Mosaic permute gathers rows of a 2-D [R, H]")
    return _permute_kernel(x, perm, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute_kernel(x, perm, backend):
    from seekax.lowering.mosaic import permute_sm90

    kernel = permute_sm90.build(perm.src_row.shape[0], x.shape[0], x.shape[1], x.dtype, permute_sm90.PermuteConfig())
    return run_kernel(kernel, perm.src_row, x, backend=backend)


def _permute_kernel_fwd(x, perm, backend):
    return _permute_kernel(x, perm, backend), perm


def _permute_kernel_bwd(backend, perm, g):
    return unpermute(g, perm), None


_permute_kernel.defvjp(_permute_kernel_fwd, _permute_kernel_bwd)


def unpermute(y: jax.Array, perm: Permutation, weights: jax.Array | None = None) -> jax.Array:
    """y: [M, H] expert outputs -> [R, H]: sum over k of weights[r, k] * y[pair_row[r, k]] (float32 sum)."""
    pairs = take0(y, perm.pair_row.reshape(-1)).reshape(perm.pair_row.shape + y.shape[1:])   # [R, K, H]
    pairs = pairs.astype(jnp.float32)
    if weights is None:
        return pairs.sum(1).astype(y.dtype)
    return jnp.einsum("rk,rkh->rh", weights.astype(jnp.float32), pairs).astype(y.dtype)
