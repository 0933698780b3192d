"""DeepEP's dispatch/combine under `shard_map` over an EP axis: validation, FP8 payload, runtime checks.

Call inside `jax.shard_map` (or with axis_name=None for one rank). Per rank: x [T, H], topk_idx [T, K]
global expert ids (-1 = unselected), topk_weights [T, K]; expert e lives on rank e // (E / ep_size).
High-throughput transports ("ragged", "padded", "ragged_emulated") return one copy per destination rank,
compact and grouped by source rank ascending in a [ep_size * capacity, H] buffer (rows past num_recv are
zero); "low_latency" returns one copy per selected expert in [E/ep_size, ep_size * capacity, H] buffers.

Data-dependent errors (expert ids out of range, capacity overflow) cannot raise while tracing: their
counts are summed over the EP axis and one `jax.debug.callback` raises on every rank at once inside the
running program (surfacing as a JaxRuntimeError that carries the message). With `drop=True` overflowing
rows are dropped instead and counted in `num_dropped`. Static cases (capacity >= tokens, concrete ids)
skip the callback; `check_ids=False` skips the id check (ids then outside [-1, E) are ignored).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.dispatch import DispatchSpec
from seekax.ir.fp8 import ACT_BLOCK, FP8_DTYPE, SCALE_BLOCK
from seekax.ir.validate import check_choice, check_int, fail
from seekax.lowering import dispatch_route as _route
from seekax.lowering import dispatch_transport as tr
from seekax.lowering.dispatch_route import Route, axis_size, high_throughput_route, low_latency_route
from seekax.lowering.reference.fp8_gemm import quantize_fp8

TRANSPORTS = ("auto", "ragged", "padded", "low_latency", "ragged_emulated")

__all__ = ["TRANSPORTS", "Dispatched", "DispatchHandle", "dispatch_layout", "ep_axis_size", "ep_combine",
           "ep_dispatch", "resolve_transport", "validate_ep_dispatch"]


def resolve_transport(transport: str) -> str:
    """"auto": ragged_all_to_all where XLA implements it (GPU, TPU), the padded all_to_all elsewhere."""
    check_choice("transport", transport, TRANSPORTS)
    if transport == "auto":
        return "ragged" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "padded"
    return transport


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What combine needs: the route, and the weights it may apply (both modes)."""

    route: Route
    recv_topk_weights: Any   # normal mode: [R, K] received weights (0 where not local); low latency: None
    topk_weights: Any        # low latency: [T, K] the source's weights (weighted combine); normal: None


jax.tree_util.register_dataclass(DispatchHandle, data_fields=["route", "recv_topk_weights", "topk_weights"],
                                 meta_fields=[])


class Dispatched(NamedTuple):
    """ep_dispatch's result on one rank (R = ep_size * capacity)."""

    x: jax.Array                   # normal: [R, H]; low latency: [E_local, R, H]; FP8: float8_e4m3fn
    x_scale: jax.Array | None      # FP8: float32 [..., H / 128] per-token, per-128-channel scales
    topk_idx: jax.Array | None     # normal: [R, K] local expert ids, -1 not local / padding row
    topk_weights: jax.Array | None  # normal: [R, K], 0 where not local
    tokens_per_expert: jax.Array   # [E_local] int32 (normal: aligned up to expert_alignment)
    num_recv: jax.Array            # normal: [] valid rows; low latency: [E_local] valid rows per expert
    num_dropped: jax.Array         # [] rows this rank could not send (always 0 unless drop=True)
    handle: DispatchHandle


def _is_tracer(a) -> bool:
    return isinstance(a, jax.core.Tracer)


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


def validate_ep_dispatch(x, topk_idx, topk_weights, *, num_experts, ep_size, transport, fp8,
                         expert_alignment, capacity) -> DispatchSpec:
    """The one validation point (every transport): shapes, dtypes, divisibility, capacity, concrete ids."""
    x_data = x[0] if isinstance(x, tuple) else x
    if getattr(x_data, "ndim", None) != 2:
        raise fail("x.shape", getattr(x_data, "shape", None), "[tokens, hidden]")
    if getattr(topk_idx, "ndim", None) != 2 or topk_idx.shape[0] != x_data.shape[0]:
        raise fail("topk_idx.shape", getattr(topk_idx, "shape", None), f"[{x_data.shape[0]}, top_k]")
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise fail("topk_idx.dtype", np.dtype(topk_idx.dtype).name, "an integer dtype")
    if topk_weights is not None and tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise fail("topk_weights.shape", tuple(topk_weights.shape), f"topk_idx.shape={tuple(topk_idx.shape)}")
    if topk_weights is not None and not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise fail("topk_weights.dtype", np.dtype(topk_weights.dtype).name, "a floating dtype")
    check_choice("transport", transport, TRANSPORTS)
    check_int("expert_alignment", expert_alignment, min_value=1)
    tokens, hidden = x_data.shape
    check_int("num_experts", num_experts, min_value=1)
    if num_experts % ep_size:
        raise fail("num_experts", num_experts, f"a multiple of the EP axis size {ep_size}")
    if capacity is not None:
        check_int("capacity", capacity, min_value=1)
    if isinstance(x, tuple):
        if len(x) != 2 or np.dtype(x[0].dtype).name != FP8_DTYPE:
            raise fail("x", "tuple", "(x_fp8 float8_e4m3fn [T, H], scale float32 [T, H/128])")
        if tuple(x[1].shape) != (tokens, -(-hidden // SCALE_BLOCK)):
            raise fail("x_scale.shape", tuple(x[1].shape), f"({tokens}, {-(-hidden // SCALE_BLOCK)})")
    elif fp8 and hidden % SCALE_BLOCK:
        raise fail("x.shape", tuple(x.shape), f"hidden a multiple of {SCALE_BLOCK} for the FP8 payload")
    if not _is_tracer(topk_idx):
        ids = np.asarray(topk_idx)
        bad = (ids < -1) | (ids >= num_experts)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise fail("topk_idx", int(ids[where]), f"expert ids in [-1, {num_experts}) (first bad at {where})")
    dtype = FP8_DTYPE if (fp8 or isinstance(x, tuple)) else np.dtype(x_data.dtype).name
    if dtype not in ("bfloat16", "float16", "float32", FP8_DTYPE):
        raise fail("x.dtype", dtype, "bfloat16, float16, float32 (or an FP8 tuple)")
    return DispatchSpec(tokens=tokens, hidden=hidden, num_experts=num_experts, top_k=topk_idx.shape[1],
                        ep_size=ep_size, dtype=dtype, capacity=capacity)


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [T, H] (H a multiple of 128) -> (e4m3 [T, H], float32 scales [T, H/128]): DeepEP's per-token 1x128
    FP8 payload, the shared quantiser's numbers (`seekax.ir.fp8`: an all-zero block gets scale 1e-4 / 448)."""
    return quantize_fp8(x, ACT_BLOCK)


def _raise_on_host(bad_ids, first_id, dropped, *, num_experts, capacity):
    if int(bad_ids) > 0:
        raise ValueError(f"topk_idx={int(first_id)}: expected expert ids in [-1, {num_experts}) "
                         f"({int(bad_ids)} bad entries over the EP group)")
    if int(dropped) > 0:
        raise ValueError(f"num_dropped={int(dropped)}: expected 0, capacity={capacity} overflowed (pass a "
                         "larger capacity, or drop=True to drop rows and get their count)")


def _runtime_checks(topk_idx, num_experts, dropped, axis_name, *, check_ids: bool, check_capacity: bool,
                    capacity) -> None:
    """One host callback that raises on every rank at once: the error counts are psum'ed over the EP axis
    first, so no rank stops while its peers wait in a collective (a lone failing rank deadlocks the
    group: XLA:CPU aborts the process after its 40 s rendezvous timeout)."""
    check_ids = check_ids and _is_tracer(topk_idx)
    if not (check_ids or check_capacity):
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    first = jnp.where(bad, topk_idx, 0).reshape(-1)[jnp.argmax(bad.reshape(-1))]
    counts = jnp.stack([bad.sum(dtype=jnp.int32) if check_ids else jnp.int32(0),
                        dropped.astype(jnp.int32) if check_capacity else jnp.int32(0)])
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
        first = jax.lax.pmax(jnp.where(bad.any(), first, jnp.iinfo(jnp.int32).min), axis_name)
    jax.debug.callback(functools.partial(_raise_on_host, num_experts=num_experts, capacity=capacity),
                       counts[0], first, counts[1])


def ep_dispatch(x, topk_idx: jax.Array, topk_weights: jax.Array | None = None, *, num_experts: int,
                axis_name, transport: str = "auto", fp8: bool = False, expert_alignment: int = 1,
                capacity: int | None = None, drop: bool = False, check_ids: bool = True) -> Dispatched:
    """Send each token to the ranks (normal) or experts (low_latency) it selected.

    x: [T, H] (or an FP8 tuple (x_fp8 [T, H], scale [T, H/128])); topk_idx: [T, K]; topk_weights: [T, K].
    capacity: normal mode, rows kept per (source, destination) pair (None = T, the worst case); low latency,
    DeepEP's num_max_dispatch_tokens_per_rank (copies per (source, expert); None = T).
    Differentiable in x and topk_weights (bf16/f32 payloads): the VJP is a combine.
    """
    p = ep_axis_size(axis_name)
    spec = validate_ep_dispatch(x, topk_idx, topk_weights, num_experts=num_experts, ep_size=p,
                                transport=transport, fp8=fp8, expert_alignment=expert_alignment,
                                capacity=capacity)
    transport = resolve_transport(transport)
    t, k = spec.tokens, spec.top_k
    cap = t if capacity is None else capacity
    topk_idx = topk_idx.astype(jnp.int32)
    if topk_weights is None:
        topk_weights = jnp.ones((t, k), jnp.float32)
    if transport == "low_latency":
        route, dropped, num_recv = low_latency_route(topk_idx, num_experts=num_experts, axis_name=axis_name,
                                                     max_tokens_per_rank=cap)
    else:
        route, dropped, num_recv = high_throughput_route(topk_idx, num_experts=num_experts, axis_name=axis_name,
                                                         capacity=cap, transport=transport)
    # A token sends at most one copy per rank (normal) or per expert (low latency; top-k ids are distinct),
    # so capacity >= T can never overflow and needs no runtime check.
    _runtime_checks(topk_idx, num_experts, dropped, axis_name, check_ids=check_ids,
                    check_capacity=(not drop and cap < t), capacity=cap)

    if isinstance(x, tuple) or fp8:
        xq, scale = x if isinstance(x, tuple) else quantize_per_token(x)
        bits = tr.send_tokens(jax.lax.bitcast_convert_type(xq, jnp.uint8), route)
        recv_x = jax.lax.bitcast_convert_type(bits, FP8_DTYPE)
        recv_scale = tr.send_tokens(scale.astype(jnp.float32), route)
    else:
        recv_x, recv_scale = tr.dispatch_rows(x, route), None

    if transport == "low_latency":
        handle = DispatchHandle(route=route, recv_topk_weights=None, topk_weights=topk_weights)
        return Dispatched(recv_x, recv_scale, None, None, num_recv.astype(jnp.int32), num_recv.astype(jnp.int32),
                          dropped, handle)

    per_rank = num_experts // p
    sd = route.slot_dest[:, :, None]                                             # [T, S, 1] slot's rank
    local = topk_idx[:, None, :] - sd * per_rank                                 # [T, S, K]
    is_local = (topk_idx[:, None, :] >= 0) & (topk_idx[:, None, :] // per_rank == sd)
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
    handle = DispatchHandle(route=route, recv_topk_weights=recv_w, topk_weights=None)
    return Dispatched(recv_x, recv_scale, recv_idx, recv_w, counts, num_recv.astype(jnp.int32), dropped, handle)


def ep_combine(y: jax.Array, handle: DispatchHandle, *, weighted: bool = False) -> jax.Array:
    """Sum each token's copies back to its source position: y [*recv_shape, H] -> [T, H] in y.dtype.

    Normal mode: weighted scales each received copy by the sum of its local top-k weights (use it when a
    copy's output is not yet weighted); low latency: weighted = sum_k topk_weights[t, k] * y[copy(t, k)],
    DeepEP's low-latency combine. Accumulation in float32. Differentiable: the VJP is a dispatch.
    """
    route = handle.route
    lead = route.recv_shape
    if getattr(y, "ndim", None) != len(lead) + 1 or tuple(y.shape[:len(lead)]) != lead:
        raise fail("y.shape", getattr(y, "shape", None), f"{lead + ('hidden',)} (the dispatched layout)")
    if route.transport != "low_latency":
        if weighted:
            scale = handle.recv_topk_weights.astype(jnp.float32).sum(-1, keepdims=True)    # [R, 1]
            y = (y.astype(jnp.float32) * scale).astype(y.dtype)
        return tr.combine_rows(y, route)
    if not weighted:
        return tr.combine_rows(y, route)
    copies = tr.collect(y, route)                                                       # [T, K, H]
    w = handle.topk_weights.astype(jnp.float32)
    return jnp.einsum("tk,tkh->th", w, copies.astype(jnp.float32)).astype(y.dtype)


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
    return _route.dispatch_layout(jnp.asarray(topk_idx, jnp.int32), num_experts, ep_size)
