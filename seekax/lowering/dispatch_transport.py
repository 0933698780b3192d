"""Moving rows along a Route, and the four differentiable primitives built on it.

`forward` sends a send buffer [B, D] to the received layout [*recv_shape, D]; `backward` is its exact
adjoint (received rows back to the send-buffer positions they came from). Transports:
- "padded" / "low_latency": one dense `all_to_all` of [P, B/P, D] plus a local compaction gather;
- "ragged": `lax.ragged_all_to_all` straight into the compact layout (GPU/TPU; XLA:CPU lacks it);
- "ragged_emulated": the ragged offsets with ragged_all_to_all emulated by dense collectives, so the
  ragged index arithmetic is tested on CPU.
Primitives (custom VJPs, each the adjoint of another): dispatch_rows^T = combine_rows, distribute^T = collect.
Each backward rule calls its adjoint primitive, so higher-order derivatives keep these rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seekax.lowering.dispatch_route import DENSE_TRANSPORTS, Route, all_to_all, axis_size, take0


def _ragged_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
    """Same contract as lax.ragged_all_to_all, through dense all_to_all (test transport; P*N*D memory)."""
    n, m = operand.shape[0], output.shape[0]
    p = input_offsets.shape[0]
    i = jnp.arange(n, dtype=jnp.int32)
    src = jnp.where(i[None] < send_sizes[:, None], input_offsets[:, None] + i[None], n)   # [P, N]
    blocks = all_to_all(take0(operand, src.reshape(-1)).reshape((p, n) + operand.shape[1:]), axis_name)
    their_offsets = all_to_all(output_offsets.reshape(p, 1), axis_name).reshape(p)        # [P(src)]
    dst = jnp.where(i[None] < recv_sizes[:, None], their_offsets[:, None] + i[None], m)   # [P, N]
    return output.at[dst.reshape(-1)].set(blocks.reshape((p * n,) + operand.shape[1:]), mode="drop")


def _ragged(route: Route, operand, output, in_off, sizes, out_off, recv_sizes):
    if route.axis_name is None or route.transport == "ragged_emulated":
        return _ragged_emulated(operand, output, in_off, sizes, out_off, recv_sizes, route.axis_name)
    return lax.ragged_all_to_all(operand, output, in_off, sizes, out_off, recv_sizes, axis_name=route.axis_name)


def forward(buf: jax.Array, route: Route) -> jax.Array:
    """Send buffer [B, D...] -> received rows [*recv_shape, D...] (zeros past the valid rows)."""
    tail = buf.shape[1:]
    if route.transport in DENSE_TRANSPORTS:
        p = axis_size(route.axis_name)
        padded = all_to_all(buf.reshape((p, route.buf_rows // p) + tail), route.axis_name)
        out = take0(padded.reshape((route.buf_rows,) + tail), route.recv_index)
    else:
        out = _ragged(route, buf, jnp.zeros((route.recv_rows,) + tail, buf.dtype), route.send_offsets,
                      route.send_counts, route.out_offsets, route.recv_counts)
    return out.reshape(route.recv_shape + tail)


def backward(y: jax.Array, route: Route) -> jax.Array:
    """Received rows [*recv_shape, D...] -> send-buffer rows [B, D...] at the ranks they came from."""
    tail = y.shape[len(route.recv_shape):]
    flat = y.reshape((route.recv_rows,) + tail)
    if route.transport in DENSE_TRANSPORTS:
        p = axis_size(route.axis_name)
        padded = take0(flat, route.unc_index).reshape((p, route.buf_rows // p) + tail)
        return all_to_all(padded, route.axis_name).reshape((route.buf_rows,) + tail)
    return _ragged(route, flat, jnp.zeros((route.buf_rows,) + tail, y.dtype), route.recv_offsets,
                   route.recv_counts, route.back_offsets, route.send_counts)


def send_tokens(x: jax.Array, route: Route) -> jax.Array:
    """x: [T, D...] -> [*recv_shape, D...], each slot's copy of its token (not differentiable: any dtype)."""
    return forward(take0(x, route.buf_slot // route.slots), route)


def send_slots(v: jax.Array, route: Route) -> jax.Array:
    """v: [T, S, D...] per-slot values -> [*recv_shape, D...] (not differentiable: any dtype)."""
    t, s = v.shape[:2]
    return forward(take0(v.reshape((t * s,) + v.shape[2:]), route.buf_slot), route)


def collect_raw(y: jax.Array, route: Route) -> jax.Array:
    """Received rows [*recv_shape, D] -> [T, S, D] per source slot (zeros for slots never sent)."""
    back = backward(y, route)
    out = take0(back, route.slot_buf)
    return out.reshape((route.num_tokens, route.slots) + back.shape[1:])


def _sum_slots(v: jax.Array) -> jax.Array:
    return v.astype(jnp.float32).sum(1).astype(v.dtype)


@jax.custom_vjp
def dispatch_rows(x: jax.Array, route: Route) -> jax.Array:
    """x: [T, D] -> [*recv_shape, D]; VJP = combine_rows."""
    return send_tokens(x, route)


def _dispatch_fwd(x, route):
    return send_tokens(x, route), route


def _dispatch_bwd(route, g):
    return combine_rows(g, route), None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine_rows(y: jax.Array, route: Route) -> jax.Array:
    """y: [*recv_shape, D] -> [T, D], the sum of each token's copies (float32 sum); VJP = dispatch_rows."""
    return _sum_slots(collect_raw(y, route))


def _combine_fwd(y, route):
    return combine_rows(y, route), route


def _combine_bwd(route, g):
    return dispatch_rows(g, route), None


combine_rows.defvjp(_combine_fwd, _combine_bwd)


@jax.custom_vjp
def distribute(v: jax.Array, route: Route) -> jax.Array:
    """v: [T, S, D] per-slot rows -> [*recv_shape, D]; VJP = collect."""
    return send_slots(v, route)


def _distribute_fwd(v, route):
    return send_slots(v, route), route


def _distribute_bwd(route, g):
    return collect(g, route), None


distribute.defvjp(_distribute_fwd, _distribute_bwd)


@jax.custom_vjp
def collect(y: jax.Array, route: Route) -> jax.Array:
    """y: [*recv_shape, D] -> [T, S, D] per-slot rows; VJP = distribute."""
    return collect_raw(y, route)


def _collect_fwd(y, route):
    return collect_raw(y, route), route


def _collect_bwd(route, g):
    return distribute(g, route), None


collect.defvjp(_collect_fwd, _collect_bwd)
