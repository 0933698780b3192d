"""ep_dispatch's one validation point, its cached-handle checks, and the run-time checks of traced data.

Static errors (shapes, dtypes, divisibility, concrete ids) raise ValueError at trace time, naming the
argument. Data-dependent errors on traced values (ids or ranks out of range, a rank's token count past its
rows, capacity overflow) are counted, summed over the EP axis and raised by one host callback on every rank
together: a rank that raised alone would leave its peers waiting in the next collective.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.dispatch import DispatchSpec
from seekax.ir.fp8 import FP8_DTYPE, SCALE_BLOCK
from seekax.ir.validate import check_choice, check_int, fail

TRANSPORTS = ("auto", "ragged", "padded", "low_latency", "ragged_emulated")


def is_tracer(a) -> bool:
    return isinstance(a, jax.core.Tracer)


def _check_payload(x, tokens_expected: int | None, fp8: bool) -> tuple[int, int]:
    """x: [T, H] or the FP8 tuple (x_fp8 [T, H], scale [T, H/128]) -> (T, H)."""
    x_data = x[0] if isinstance(x, tuple) else x
    if getattr(x_data, "ndim", None) != 2:
        raise fail("x.shape", getattr(x_data, "shape", None), "[tokens, hidden]")
    tokens, hidden = x_data.shape
    if tokens_expected is not None and tokens != tokens_expected:
        raise fail("x.shape", tuple(x_data.shape), f"[{tokens_expected}, hidden] (the handle's token count)")
    if isinstance(x, tuple):
        if len(x) != 2 or np.dtype(x[0].dtype).name != FP8_DTYPE:
            raise fail("x", "tuple", "(x_fp8 float8_e4m3fn [T, H], scale float32 [T, H/128])")
        if tuple(x[1].shape) != (tokens, -(-hidden // SCALE_BLOCK)):
            raise fail("x_scale.shape", tuple(x[1].shape), f"({tokens}, {-(-hidden // SCALE_BLOCK)})")
    elif fp8 and hidden % SCALE_BLOCK:
        raise fail("x.shape", tuple(x.shape), f"hidden a multiple of {SCALE_BLOCK} for the FP8 payload")
    dtype = FP8_DTYPE if (fp8 or isinstance(x, tuple)) else np.dtype(x_data.dtype).name
    if dtype not in ("bfloat16", "float16", "float32", FP8_DTYPE):
        raise fail("x.dtype", dtype, "bfloat16, float16, float32 (or an FP8 tuple)")
    return tokens, hidden


def check_num_tokens(num_tokens, tokens: int):
    """num_tokens: None, an int, or an integer array of shape [] or [1] (one rank's own count under
    shard_map) -> None, an int in [0, T], or an int32 [] tracer (checked at run time)."""
    if num_tokens is None:
        return None
    if isinstance(num_tokens, (int, np.integer)) and not isinstance(num_tokens, bool):
        n = int(num_tokens)
    else:
        shape = tuple(getattr(num_tokens, "shape", (None,)))
        if shape not in ((), (1,)) or not jnp.issubdtype(num_tokens.dtype, jnp.integer):
            raise fail("num_tokens", shape, "an int or an integer array of shape [] or [1] (this rank's count)")
        num_tokens = jnp.asarray(num_tokens, jnp.int32).reshape(())
        if is_tracer(num_tokens):
            return num_tokens
        n = int(num_tokens)
    if not 0 <= n <= tokens:
        raise fail("num_tokens", n, f"a token count in [0, {tokens}] (x has {tokens} rows)")
    return n


def check_concrete_ids(name: str, ids, upper: int, num_tokens=None) -> None:
    """Concrete ids (rows below a concrete num_tokens) must lie in [-1, upper): a gather would clamp the others
    onto a real expert. Traced ids are the caller's contract."""
    if is_tracer(ids) or is_tracer(num_tokens):
        return
    a = np.asarray(ids).astype(np.int64)  # unsigned ids compare with -1 as numbers
    if num_tokens is not None:
        a = a[:num_tokens]
    bad = (a < -1) | (a >= upper)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise fail(name, int(a[where]), f"values in [-1, {upper}) (first bad at {where})")


def validate_ep_dispatch(x, topk_idx, topk_weights, *, num_experts, ep_size, transport, fp8, expert_alignment,
                         capacity, num_tokens=None, dest_rank=None, is_token_in_rank=None) -> DispatchSpec:
    """The one validation point of a fresh dispatch (every transport): shapes, dtypes, divisibility, capacity,
    concrete ids. Top-k mode: topk_idx [T, K] over num_experts. Rank mode (topk_idx None): dest_rank [T] or
    is_token_in_rank [T, P]; the spec then counts one "expert" per rank (num_experts = P, top_k = slots)."""
    check_choice("transport", transport, TRANSPORTS)
    check_int("expert_alignment", expert_alignment, min_value=1)
    if capacity is not None:
        check_int("capacity", capacity, min_value=1)
    tokens, hidden = _check_payload(x, None, fp8)
    n = check_num_tokens(num_tokens, tokens)
    given = [name for name, a in (("topk_idx", topk_idx), ("dest_rank", dest_rank),
                                  ("is_token_in_rank", is_token_in_rank)) if a is not None]
    if len(given) != 1:
        raise fail("topk_idx", given or None, "exactly one of topk_idx [T, K], dest_rank [T] or "
                   "is_token_in_rank [T, ep_size] (or handle= for a cached dispatch)")
    if topk_idx is None:
        if topk_weights is not None:
            raise fail("topk_weights", tuple(topk_weights.shape), "None without topk_idx (rank mode has no weights)")
        if transport == "low_latency":
            raise fail("transport", transport, "a normal-mode transport without topk_idx (low latency sends one "
                       "copy per selected expert)")
        if num_experts is not None:
            check_int("num_experts", num_experts, min_value=1)
        if dest_rank is not None:
            if getattr(dest_rank, "shape", None) != (tokens,) or not jnp.issubdtype(dest_rank.dtype, jnp.integer):
                raise fail("dest_rank", getattr(dest_rank, "shape", None), f"an integer array [{tokens}]")
            check_concrete_ids("dest_rank", dest_rank, ep_size, n)
            slots = 1
        else:
            if (tuple(getattr(is_token_in_rank, "shape", ())) != (tokens, ep_size)
                    or np.dtype(is_token_in_rank.dtype) != np.bool_):
                raise fail("is_token_in_rank", getattr(is_token_in_rank, "shape", None),
                           f"a bool array [{tokens}, {ep_size}] (tokens, EP ranks)")
            slots = ep_size
        return DispatchSpec(tokens=tokens, hidden=hidden, num_experts=ep_size, top_k=slots, ep_size=ep_size,
                            dtype=_dtype(x, fp8), capacity=capacity)
    if getattr(topk_idx, "ndim", None) != 2 or topk_idx.shape[0] != tokens:
        raise fail("topk_idx.shape", getattr(topk_idx, "shape", None), f"[{tokens}, top_k]")
    if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise fail("topk_idx.dtype", np.dtype(topk_idx.dtype).name, "an integer dtype")
    if topk_weights is not None and tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise fail("topk_weights.shape", tuple(topk_weights.shape), f"topk_idx.shape={tuple(topk_idx.shape)}")
    if topk_weights is not None and not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise fail("topk_weights.dtype", np.dtype(topk_weights.dtype).name, "a floating dtype")
    check_int("num_experts", num_experts, min_value=1)
    if num_experts % ep_size:
        raise fail("num_experts", num_experts, f"a multiple of the EP axis size {ep_size}")
    check_concrete_ids("topk_idx", topk_idx, num_experts, n)
    return DispatchSpec(tokens=tokens, hidden=hidden, num_experts=num_experts, top_k=topk_idx.shape[1],
                        ep_size=ep_size, dtype=_dtype(x, fp8), capacity=capacity)


def _dtype(x, fp8: bool) -> str:
    return FP8_DTYPE if (fp8 or isinstance(x, tuple)) else np.dtype(x.dtype).name


def validate_cached(x, handle, *, fp8, ep_size, axis_name, transport, capacity, num_experts, **routing) -> None:
    """A cached dispatch sends x along the handle's route: the routing arguments must be absent, and any
    transport, capacity or num_experts given must agree with the handle's."""
    route = handle.route
    for name, a in routing.items():
        if a is not None:
            raise fail(name, getattr(a, "shape", a), "None with handle= (the handle carries the routing)")
    if axis_name != route.axis_name:
        raise fail("axis_name", axis_name, f"the handle's axis {route.axis_name!r}")
    check_choice("transport", transport, TRANSPORTS)
    if transport != "auto" and transport != route.transport:
        raise fail("transport", transport, f"'auto' or the handle's transport {route.transport!r}")
    pair_rows = route.recv_shape[-1] // ep_size
    if capacity is not None and capacity != pair_rows:
        raise fail("capacity", capacity, f"None or the handle's capacity {pair_rows}")
    local = route.recv_shape[0] if route.transport == "low_latency" else (
        None if handle.tokens_per_expert is None else handle.tokens_per_expert.shape[0])
    if num_experts is not None and local is not None and num_experts != local * ep_size:
        raise fail("num_experts", num_experts, f"None or the handle's {local * ep_size}")
    _check_payload(x, route.num_tokens, fp8)


def low_latency_repeats(ids, capacity: int, num_experts: int) -> bool:
    """Low latency sends one copy per (token, k): a row that repeats an expert can put more than T copies on one
    (source, expert) pair even with capacity >= T. Concrete ids: ValueError now if it overflows; traced ids:
    True (count the overflow at run time)."""
    if is_tracer(ids):
        return True
    a = np.asarray(ids).astype(np.int64).reshape(-1)
    per_expert = np.bincount(a[(a >= 0) & (a < num_experts)], minlength=num_experts)
    if per_expert.max() > capacity:
        e = int(per_expert.argmax())
        raise fail("capacity", capacity, f">= {int(per_expert[e])}, the copies of expert {e} this rank sends (rows "
                   "of topk_idx repeat an expert and low latency sends one copy per repeat), or drop=True")
    return False


def _raise_on_host(bad_ids, first_id, dropped, bad_n, n, *, id_name, id_upper, capacity, tokens, overflow_hint):
    if int(bad_n) > 0:
        raise ValueError(f"num_tokens={int(n)}: expected a token count in [0, {tokens}] "
                         f"({int(bad_n)} ranks out of range)")
    if int(bad_ids) > 0:
        raise ValueError(f"{id_name}={int(first_id)}: expected values in [-1, {id_upper}) "
                         f"({int(bad_ids)} bad entries over the EP group)")
    if int(dropped) > 0:
        raise ValueError(f"num_dropped={int(dropped)}: expected 0, capacity={capacity} overflowed (pass a "
                         f"larger capacity, or drop=True to drop rows and get their count){overflow_hint}")


def runtime_checks(ids, row_valid, dropped, num_tokens, axis_name, *, id_name: str, id_upper: int,
                   check_ids: bool, check_capacity: bool, capacity, tokens: int, overflow_hint: str = "") -> None:
    """ids: [T, K], [T] or None (nothing to check); row_valid: [T] rows below this rank's num_tokens.
    One host callback raising on every rank at once, inserted only for what could not be checked while
    tracing: traced ids or a traced num_tokens (unless check_ids=False: the routing data is trusted, ids
    outside the range are ignored and num_tokens is clipped to [0, T]), or a capacity below T (DeepEP's
    dedup bounds every pair by T)."""
    check_n = check_ids and is_tracer(num_tokens)
    check_ids = check_ids and ids is not None and (is_tracer(ids) or is_tracer(num_tokens))
    if not (check_ids or check_capacity or check_n):
        return
    ids2 = jnp.full((tokens, 1), -1, jnp.int32) if ids is None else jnp.asarray(ids)
    ids2 = ids2 if ids2.ndim == 2 else ids2[:, None]  # [T, K]; not reshape(T, -1), which fails for T = 0
    # Unsigned ids cannot be negative (and -1 would wrap to their maximum): compare them from above only.
    low = jnp.zeros(ids2.shape, bool) if jnp.issubdtype(ids2.dtype, jnp.unsignedinteger) else ids2 < -1
    bad = (low | (ids2 >= id_upper)) & row_valid[:, None]
    first = (jnp.where(bad, ids2, 0).reshape(-1)[jnp.argmax(bad.reshape(-1))].astype(jnp.int32) if bad.size
             else jnp.int32(0))  # no ids at all (T = 0 or K = 0): nothing can be bad
    n = num_tokens if check_n else jnp.int32(0)
    bad_n = ((n < 0) | (n > tokens)).astype(jnp.int32)
    counts = jnp.stack([bad.sum(dtype=jnp.int32) if check_ids else jnp.int32(0),
                        dropped.astype(jnp.int32) if check_capacity else jnp.int32(0), bad_n])
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
        first = jax.lax.pmax(jnp.where(bad.any(), first, jnp.iinfo(jnp.int32).min), axis_name)
        n = jax.lax.pmax(jnp.where(bad_n > 0, n, jnp.iinfo(jnp.int32).min), axis_name)
    jax.debug.callback(functools.partial(_raise_on_host, id_name=id_name, id_upper=id_upper, capacity=capacity,
                                         tokens=tokens, overflow_hint=overflow_hint),
                       counts[0], first, counts[1], counts[2], n)
