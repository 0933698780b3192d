"""DeepEP's dispatch/combine under `shard_map` over an EP axis: the public API and the FP8 payload.

Call inside `jax.shard_map` (or with axis_name=None for one rank). Per rank: x [T, H], topk_idx [T, K]
global expert ids (-1 = unselected), topk_weights [T, K]; expert e lives on rank e // (E / ep_size).
High-throughput transports ("ragged", "padded", "ragged_emulated") return one copy per destination rank,
compact and grouped by source rank ascending in a [ep_size * capacity, H] buffer (rows past num_recv are
zero); "low_latency" returns one copy per selected expert in [E/ep_size, ep_size * capacity, H] buffers.
Without top-k (dest_rank [T] or is_token_in_rank [T, P]) a dispatch is a plain permutation by rank. A
cached dispatch (handle=) sends another payload along a previous dispatch's route with no recount. A rank
may hold fewer tokens than its rows (num_tokens): rows past its count are neither sent nor combined into.

Data-dependent errors (ids out of range, a bad num_tokens, capacity overflow) cannot raise while tracing:
their counts are summed over the EP axis and one `jax.debug.callback` raises on every rank at once inside
the running program (surfacing as a JaxRuntimeError that carries the message); see `ep_checks`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.fp8 import ACT_BLOCK, FP8_DTYPE
from seekax.ir.validate import check_choice, check_int, fail
from seekax.lowering import dispatch_route as _route
from seekax.lowering import dispatch_transport as tr
from seekax.lowering.dispatch_route import Route, axis_size, high_throughput_route, low_latency_route
from seekax.lowering.reference.fp8_gemm import quantize_fp8
from seekax.ops.ep_checks import (TRANSPORTS, check_num_tokens, is_tracer, low_latency_repeats, runtime_checks,
                                  validate_cached, validate_ep_dispatch)

__all__ = ["TRANSPORTS", "Combined", "Dispatched", "DispatchHandle", "dispatch_layout", "ep_axis_size",
           "ep_combine", "ep_dispatch", "resolve_transport", "validate_ep_dispatch"]


def resolve_transport(transport: str) -> str:
    """"auto": ragged_all_to_all where XLA implements it (GPU, TPU), the padded all_to_all elsewhere."""
    check_choice("transport", transport, TRANSPORTS)
    if transport == "auto":
        return "ragged" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "padded"
    return transport


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What combine and a cached dispatch need: the route, the weights combine may apply, and the
    dispatch's received ids and counts (a cached dispatch returns them again without recounting)."""

    route: Route
    recv_topk_weights: Any   # normal mode with top-k: [R, K] received weights (0 where not local); else None
    topk_weights: Any        # low latency: [T, K] the source's weights (weighted combine); normal: None
    recv_topk_idx: Any = None       # normal mode with top-k: [R, K] local ids; else None
    tokens_per_expert: Any = None   # [E_local] int32 (normal: aligned); rank mode: None
    num_recv: Any = None            # normal: [] int32; low latency: [E_local] int32
    num_dropped: Any = None         # [] int32


jax.tree_util.register_dataclass(
    DispatchHandle, data_fields=["route", "recv_topk_weights", "topk_weights", "recv_topk_idx",
                                 "tokens_per_expert", "num_recv", "num_dropped"], meta_fields=[])


class Dispatched(NamedTuple):
    """ep_dispatch's result on one rank (R = ep_size * capacity)."""

    x: jax.Array                   # normal: [R, H]; low latency: [E_local, R, H]; FP8: float8_e4m3fn
    x_scale: jax.Array | None      # FP8: float32 [..., H / 128] per-token, per-128-channel scales
    topk_idx: jax.Array | None     # normal with top-k: [R, K] local expert ids, -1 not local / padding row
    topk_weights: jax.Array | None  # normal with top-k: [R, K], 0 where not local
    tokens_per_expert: jax.Array | None  # [E_local] int32 (normal: aligned up to expert_alignment); rank mode: None
    num_recv: jax.Array            # normal: [] valid rows; low latency: [E_local] valid rows per expert
    num_dropped: jax.Array         # [] rows this rank could not send (always 0 unless drop=True)
    handle: DispatchHandle


class Combined(NamedTuple):
    """ep_combine(..., return_weights=True): the combined rows and the combined top-k weights."""

    x: jax.Array             # [T, H]
    topk_weights: jax.Array  # [T, K]: normal mode, the sum over a token's copies; low latency, per slot


def ep_axis_size(axis_name) -> int:
    """The EP group's size: 1 for axis_name=None (one rank), else the size of a mesh axis that an enclosing
    `jax.shard_map` binds; any other axis name is a ValueError here, before JAX's unbound-axis NameError."""
    if axis_name is None:
        return 1
    try:
        return axis_size(axis_name)
    except NameError:
        raise fail("axis_name", axis_name, "a mesh axis bound by an enclosing jax.shard_map over the EP ranks "
                   "(call ep_dispatch inside shard_map), or None for a single rank") from None


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [T, H] (H a multiple of 128) -> (e4m3 [T, H], float32 scales [T, H/128]): DeepEP's per-token 1x128
    FP8 payload, the shared quantiser's numbers (`seekax.ir.fp8`: an all-zero block gets scale 1e-4 / 448)."""
    return quantize_fp8(x, ACT_BLOCK)


def _send_payload(x, fp8: bool, route: Route):
    """x [T, H] (or the FP8 tuple) along the route -> (received x, received scales or None)."""
    if isinstance(x, tuple) or fp8:
        xq, scale = x if isinstance(x, tuple) else quantize_per_token(x)
        bits = tr.send_tokens(jax.lax.bitcast_convert_type(xq, jnp.uint8), route)
        return jax.lax.bitcast_convert_type(bits, FP8_DTYPE), tr.send_tokens(scale.astype(jnp.float32), route)
    return tr.dispatch_rows(x, route), None


def _rank_ids(dest_rank, is_token_in_rank, p: int) -> jax.Array:
    """Rank mode as top-k over one "expert" per rank: [T, 1] (dest_rank) or [T, P] (is_token_in_rank)."""
    if dest_rank is not None:
        return jnp.asarray(dest_rank, jnp.int32)[:, None]
    return jnp.where(jnp.asarray(is_token_in_rank), jnp.arange(p, dtype=jnp.int32), -1)


def ep_dispatch(x, topk_idx: jax.Array | None = None, topk_weights: jax.Array | None = None, *,
                num_experts: int | None = None, axis_name, transport: str = "auto", fp8: bool = False,
                expert_alignment: int = 1, capacity: int | None = None, drop: bool = False, check_ids: bool = True,
                num_tokens=None, dest_rank: jax.Array | None = None, is_token_in_rank: jax.Array | None = None,
                handle: DispatchHandle | None = None) -> Dispatched:
    """Send each token to the ranks (normal) or experts (low_latency) it selected.

    x: [T, H] (or an FP8 tuple (x_fp8 [T, H], scale [T, H/128])); topk_idx: [T, K]; topk_weights: [T, K].
    capacity: normal mode, rows kept per (source, destination) pair (None = T, the worst case); low latency,
    DeepEP's num_max_dispatch_tokens_per_rank (copies per (source, expert); None = T).
    num_tokens: this rank's own token count (int, or an integer array [] / [1] under shard_map; None = T):
    rows from num_tokens on are not sent, and combine returns zeros there.
    Without top-k (topk_idx None): dest_rank [T] (one rank a token, -1 = none) or is_token_in_rank [T, P]
    (DeepEP's layout mask, any ranks a token) route whole tokens by rank; normal-mode transports only.
    handle: a previous dispatch's handle: x travels along its route (same routing, no recount: no counting,
    cumsum or count exchange), and the result repeats its ids, weights and counts; the routing arguments
    must then be None. Differentiable in x and topk_weights (bf16/f32 payloads): the VJP is a combine.
    """
    p = ep_axis_size(axis_name)
    if handle is not None:
        validate_cached(x, handle, fp8=fp8, ep_size=p, axis_name=axis_name, transport=transport, capacity=capacity,
                        num_experts=num_experts, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens=num_tokens,
                        dest_rank=dest_rank, is_token_in_rank=is_token_in_rank)
        recv_x, recv_scale = _send_payload(x, fp8, handle.route)
        return Dispatched(recv_x, recv_scale, handle.recv_topk_idx, handle.recv_topk_weights,
                          handle.tokens_per_expert, handle.num_recv, handle.num_dropped, handle)
    spec = validate_ep_dispatch(x, topk_idx, topk_weights, num_experts=num_experts, ep_size=p, transport=transport,
                                fp8=fp8, expert_alignment=expert_alignment, capacity=capacity, num_tokens=num_tokens,
                                dest_rank=dest_rank, is_token_in_rank=is_token_in_rank)
    transport = resolve_transport(transport)
    t = spec.tokens
    cap = t if capacity is None else capacity
    rank_mode = topk_idx is None
    ids = _rank_ids(dest_rank, is_token_in_rank, p) if rank_mode else topk_idx.astype(jnp.int32)   # [T, K]
    k = ids.shape[1]
    n = check_num_tokens(num_tokens, t)
    row_valid = jnp.arange(t) < (t if n is None else jnp.clip(n, 0, t))                    # [T]
    if n is not None:
        ids = jnp.where(row_valid[:, None], ids, -1)
    e = p if rank_mode else num_experts
    if transport == "low_latency":
        route, dropped, num_recv = low_latency_route(ids, num_experts=e, axis_name=axis_name,
                                                     max_tokens_per_rank=cap)
    else:
        route, dropped, num_recv = high_throughput_route(ids, num_experts=e, axis_name=axis_name, capacity=cap,
                                                         transport=transport)
    # A token sends at most one copy per rank (normal) or per selected expert (low latency), so capacity >= T
    # overflows only when a low-latency row repeats an expert: checked with the ids (check_ids=False trusts them).
    # is_token_in_rank has no ids to check (a bool mask is always in range).
    repeats = (transport == "low_latency" and not drop and cap >= t and check_ids
               and low_latency_repeats(ids, cap, num_experts))
    runtime_checks(dest_rank if rank_mode else topk_idx, row_valid, dropped, n, axis_name,
                   id_name="dest_rank" if rank_mode else "topk_idx", id_upper=e, check_ids=check_ids,
                   check_capacity=not drop and (cap < t or repeats), capacity=cap, tokens=t,
                   overflow_hint=" (rows of topk_idx repeat an expert: low latency sends one copy per repeat)"
                   if repeats else "")
    recv_x, recv_scale = _send_payload(x, fp8, route)
    num_recv, dropped = num_recv.astype(jnp.int32), dropped.astype(jnp.int32)

    if rank_mode:
        handle = DispatchHandle(route=route, recv_topk_weights=None, topk_weights=None, num_recv=num_recv,
                                num_dropped=dropped)
        return Dispatched(recv_x, recv_scale, None, None, None, num_recv, dropped, handle)
    if topk_weights is None:
        topk_weights = jnp.ones((t, k), jnp.float32)
    if transport == "low_latency":
        handle = DispatchHandle(route=route, recv_topk_weights=None, topk_weights=topk_weights,
                                tokens_per_expert=num_recv, num_recv=num_recv, num_dropped=dropped)
        return Dispatched(recv_x, recv_scale, None, None, num_recv, num_recv, dropped, handle)

    per_rank = num_experts // p
    sd = route.slot_dest[:, :, None]                                             # [T, S, 1] slot's rank
    local = ids[:, None, :] - sd * per_rank                                      # [T, S, K]
    is_local = (ids[:, None, :] >= 0) & (ids[:, None, :] // per_rank == sd)
    # Local ids and weights travel together in one float32 payload [R, 2K] (ids bitcast), differentiable in
    # the weights; received rows past num_recv are padding.
    ids_bits = jax.lax.bitcast_convert_type(jnp.where(is_local, local, -1).astype(jnp.int32), jnp.float32)
    w_slots = jnp.where(is_local, topk_weights.astype(jnp.float32)[:, None, :], 0.0)        # [T, S, K]
    meta = tr.distribute(jnp.concatenate([ids_bits, w_slots], -1), route)                    # [R, 2K]
    valid = jnp.arange(meta.shape[0]) < num_recv                                             # [R]
    recv_idx = jnp.where(valid[:, None], jax.lax.bitcast_convert_type(meta[:, :k], jnp.int32), -1)
    recv_w = meta[:, k:].astype(topk_weights.dtype)
    counts = (recv_idx[:, :, None] == jnp.arange(per_rank)).sum((0, 1), dtype=jnp.int32)   # [E_local]
    counts = -(-counts // expert_alignment) * expert_alignment
    handle = DispatchHandle(route=route, recv_topk_weights=recv_w, topk_weights=None, recv_topk_idx=recv_idx,
                            tokens_per_expert=counts, num_recv=num_recv, num_dropped=dropped)
    return Dispatched(recv_x, recv_scale, recv_idx, recv_w, counts, num_recv, dropped, handle)


def _combined_weights(handle: DispatchHandle, topk_weights) -> jax.Array:
    """The top-k weights combined back to the sources: [T, K] (see ep_combine)."""
    route = handle.route
    lead = route.recv_shape
    if topk_weights is None:
        if route.transport == "low_latency":       # each delivered copy returns its own weight: no traffic
            delivered = (route.slot_buf < route.buf_rows).reshape(route.num_tokens, route.slots)
            return jnp.where(delivered, handle.topk_weights, 0).astype(handle.topk_weights.dtype)
        if handle.recv_topk_weights is None:
            raise fail("topk_weights", None, "[R, K] received weights to combine (a dispatch without top-k "
                       "carries none)")
        topk_weights = handle.recv_topk_weights
    if route.transport == "low_latency":
        if tuple(getattr(topk_weights, "shape", ())) != lead:
            raise fail("topk_weights.shape", getattr(topk_weights, "shape", None), f"{lead} (one per copy)")
        return tr.collect(topk_weights[..., None], route)[..., 0]                             # [T, K]
    if getattr(topk_weights, "ndim", None) != 2 or topk_weights.shape[0] != lead[0]:
        raise fail("topk_weights.shape", getattr(topk_weights, "shape", None), f"[{lead[0]}, top_k]")
    return tr.combine_rows(topk_weights, route)                                              # [T, K]


def ep_combine(y: jax.Array, handle: DispatchHandle, *, weighted: bool = False, return_weights: bool = False,
               topk_weights: jax.Array | None = None):
    """Sum each token's copies back to its source position: y [*recv_shape, H] -> [T, H] in y.dtype.

    Normal mode: weighted scales each received copy by the sum of its local top-k weights (use it when a
    copy's output is not yet weighted); low latency: weighted = sum_k topk_weights[t, k] * y[copy(t, k)],
    DeepEP's low-latency combine. Accumulation in float32. Differentiable: the VJP is a dispatch.
    return_weights: return Combined(x, topk_weights [T, K]) with DeepEP's combined top-k weights: normal
    mode, the received weights (topk_weights [R, K] if given, else the dispatched ones) summed over each
    token's copies (one more collective, [R, K] float); low latency, each slot's weight where its copy was
    delivered (topk_weights [E_local, P*M] per received copy if given, else the source's, with no traffic).
    """
    route = handle.route
    lead = route.recv_shape
    if getattr(y, "ndim", None) != len(lead) + 1 or tuple(y.shape[:len(lead)]) != lead:
        raise fail("y.shape", getattr(y, "shape", None), f"{lead + ('hidden',)} (the dispatched layout)")
    if topk_weights is not None and not return_weights:
        raise fail("topk_weights", tuple(topk_weights.shape), "None unless return_weights=True")
    if weighted and route.transport != "low_latency" and handle.recv_topk_weights is None:
        raise fail("weighted", weighted, "False for a dispatch without top-k (no weights to apply)")
    combined_w = _combined_weights(handle, topk_weights) if return_weights else None
    if route.transport != "low_latency":
        if weighted:
            scale = handle.recv_topk_weights.astype(jnp.float32).sum(-1, keepdims=True)    # [R, 1]
            y = (y.astype(jnp.float32) * scale).astype(y.dtype)
        out = tr.combine_rows(y, route)
    elif not weighted:
        out = tr.combine_rows(y, route)
    else:
        copies = tr.collect(y, route)                                                       # [T, K, H]
        w = handle.topk_weights.astype(jnp.float32)
        out = jnp.einsum("tk,tkh->th", w, copies.astype(jnp.float32)).astype(y.dtype)
    return Combined(out, combined_w) if return_weights else out


def dispatch_layout(topk_idx: jax.Array, num_experts: int, ep_size: int):
    """DeepEP's get_dispatch_layout for one rank. topk_idx: [T, K] global expert ids (-1 = unselected) ->
    (num_tokens_per_rank [ep_size] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, ep_size] bool)."""
    check_int("num_experts", num_experts, min_value=1)
    check_int("ep_size", ep_size, min_value=1)
    if num_experts % ep_size:
        raise fail("num_experts", num_experts, f"a multiple of ep_size={ep_size}")
    if getattr(topk_idx, "ndim", None) != 2 or not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise fail("topk_idx", getattr(topk_idx, "shape", None), "an integer array [tokens, top_k]")
    if not is_tracer(topk_idx):
        ids = np.asarray(topk_idx)
        if ((ids < -1) | (ids >= num_experts)).any():
            raise fail("topk_idx", int(ids[(ids < -1) | (ids >= num_experts)][0]), f"ids in [-1, {num_experts})")
    return _route.dispatch_layout(jnp.asarray(topk_idx, jnp.int32), num_experts, ep_size)
