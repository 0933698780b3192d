"""Routing from logical expert ids to physical replicas (the placement applied to one MoE layer's top-k).

The router picks logical experts; EPLB placed each one on logcnt[e] physical slots. A token's traffic to
expert e goes to replica `t % logcnt[e]` (t = the token's global index), so replicas of a hot expert
share its tokens evenly and deterministically (no randomness, the same answer on every rank).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.validate import fail
from seekax.ops.ep_checks import check_concrete_ids


def _check(topk_idx: Any, log2phy: Any, logcnt: Any) -> None:
    if topk_idx.ndim != 2:
        raise fail("topk_idx.shape", tuple(topk_idx.shape), "(tokens, top_k)")
    if log2phy.ndim != 2:
        raise fail("log2phy.shape", tuple(log2phy.shape), "(experts, maxcnt) for one layer")
    if logcnt.ndim != 1 or logcnt.shape[0] != log2phy.shape[0]:
        raise fail("logcnt.shape", tuple(logcnt.shape), f"({log2phy.shape[0]},) to match log2phy")
    for name, a in (("topk_idx", topk_idx), ("log2phy", log2phy), ("logcnt", logcnt)):
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise fail(f"{name}.dtype", str(a.dtype), "an integer dtype")
    check_concrete_ids("topk_idx", topk_idx, logcnt.shape[0])


def route_to_replicas(topk_idx: jax.Array, log2phy: jax.Array, logcnt: jax.Array, *,
                      token_offset: int | jax.Array = 0) -> jax.Array:
    """Map logical expert ids to physical slot ids for one layer. jit-able.

    topk_idx: [tokens, top_k] logical ids; -1 (no expert) passes through as -1. Concrete ids outside
      [-1, experts) raise ValueError; traced ids are trusted (moe_layer's come from its own router).
    log2phy:  [experts, maxcnt] physical slots of each expert, -1 padded (one layer of ExpertPlacement).
    logcnt:   [experts] replicas per expert (>= 1).
    token_offset: global index of row 0 (when each EP rank routes its own shard of the tokens).
    Returns [tokens, top_k] physical slot ids, log2phy[e, t % logcnt[e]], in topk_idx's dtype.
    """
    topk_idx, log2phy, logcnt = jnp.asarray(topk_idx), jnp.asarray(log2phy), jnp.asarray(logcnt)
    _check(topk_idx, log2phy, logcnt)
    valid = topk_idx >= 0  # [T, k]
    expert = jnp.where(valid, topk_idx, 0)  # [T, k]
    count = jnp.maximum(logcnt[expert], 1)  # [T, k]
    token = jnp.arange(topk_idx.shape[0], dtype=jnp.int32)[:, None] + jnp.asarray(token_offset, jnp.int32)
    replica = token % count  # [T, k]
    phys = log2phy[expert, replica]  # [T, k]
    return jnp.where(valid, phys, -1).astype(topk_idx.dtype)


def route_to_replicas_np(topk_idx: Any, log2phy: Any, logcnt: Any, *, token_offset: int = 0) -> np.ndarray:
    """The same mapping in plain numpy, written as a loop: the test oracle."""
    topk_idx, log2phy, logcnt = np.asarray(topk_idx), np.asarray(log2phy), np.asarray(logcnt)
    out = np.full(topk_idx.shape, -1, dtype=np.int64)
    for t in range(topk_idx.shape[0]):
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[t, j])
            if e >= 0:
                out[t, j] = log2phy[e, (t + token_offset) % int(logcnt[e])]
    return out
