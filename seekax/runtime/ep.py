"""Expert-parallel dispatch/combine for model code (DeepEP's API under `jax.shard_map`).

`dispatch_layout` (validated), `ep_dispatch`, `ep_combine`: see `seekax.lowering.dispatch` for the
semantics, transports ("auto" | "ragged" | "padded" | "low_latency") and how overflow errors surface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.validate import check_int, fail
from seekax.lowering import dispatch as _impl
from seekax.lowering.dispatch import Dispatched as Dispatched
from seekax.lowering.dispatch import DispatchHandle as DispatchHandle
from seekax.lowering.dispatch import TRANSPORTS as TRANSPORTS
from seekax.lowering.dispatch import ep_combine as ep_combine
from seekax.lowering.dispatch import ep_dispatch as ep_dispatch
from seekax.lowering.dispatch import resolve_transport as resolve_transport


def dispatch_layout(topk_idx: jax.Array, num_experts: int, ep_size: int):
    """DeepEP's get_dispatch_layout for one rank. topk_idx: [T, K] global expert ids (-1 = unselected) ->
    (num_tokens_per_rank [ep_size] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, ep_size] bool)."""
    check_int("num_experts", num_experts, min_value=1)
    check_int("ep_size", ep_size, min_value=1)
    if num_experts % ep_size:
        raise fail("num_experts", num_experts, f"a multiple of ep_size={ep_size}")
    if getattr(topk_idx, "ndim", None) != 2 or not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise fail("topk_idx", getattr(topk_idx, "shape", None), "an integer array [tokens, top_k]")
    if not isinstance(topk_idx, jax.core.Tracer):
        ids = np.asarray(topk_idx)
        if ((ids < -1) | (ids >= num_experts)).any():
            raise fail("topk_idx", int(ids[(ids < -1) | (ids >= num_experts)][0]), f"ids in [-1, {num_experts})")
    return _impl.dispatch_layout(jnp.asarray(topk_idx, jnp.int32), num_experts, ep_size)
