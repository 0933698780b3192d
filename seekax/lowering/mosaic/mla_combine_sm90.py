"""Split-KV combine for MLA decode in Pallas Mosaic GPU (FlashMLA's combine kernel).

Grid (batch, row tiles), one warpgroup: for each of its 64 query rows the CTA reads the row's partial
log-sum-exps (scalars), then sums the fp32 partial rows weighted by exp(lse_t - lse) with 16-byte vector
loads (WG_STRIDED layout, 4 floats a thread) and writes the row in the output dtype and the merged lse. It reads
every partial once and writes the outputs once; the XLA combine (`reference.combine_splits`) materialises a
scatter-add result in fp32 on the way. Batches with no split get out = 0 and lse = `lse_empty` (-inf, or
FlashMLA's +inf). With an attention sink the row is also scaled by 1 / (1 + exp(sink - lse)) (lse unchanged):
the epilogue FlashMLA applies, folded into the one weight each partial row gets.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

ROWS_PER_CTA = 64


def _kernel(split_offsets_ref, out_p_ref, lse_p_ref, *refs, lse_empty: float, sink: bool):
    """split_offsets [B+1]; out_p [T, R, v] f32; lse_p [T, R] f32; (sink) sink_rows [G, R] f32, batch b's row r
    taking sink_rows[b % G, r] -> out [B, R, v]; lse [B, R] f32."""
    sink_ref, out_ref, lse_ref = refs if sink else (None, *refs)
    v_dim = out_p_ref.shape[-1]
    layout = plgpu.Layout.WG_STRIDED((v_dim,), vec_size=4)
    b, rt = lax.axis_index("b"), lax.axis_index("rt")
    start, end = split_offsets_ref[b], split_offsets_ref[b + 1]

    @pl.loop(rt * ROWS_PER_CTA, (rt + 1) * ROWS_PER_CTA)
    def _row(r):
        m = lax.fori_loop(start, end, lambda t, m: jnp.maximum(m, lse_p_ref[t, r]), jnp.float32(-jnp.inf))
        m_safe = jnp.where(m == -jnp.inf, jnp.float32(0), m)
        total = lax.fori_loop(start, end, lambda t, s: s + jnp.exp(lse_p_ref[t, r] - m_safe), jnp.float32(0))
        seen = total > 0
        lse = m_safe + jnp.log(jnp.where(seen, total, 1.0))
        inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), jnp.float32(0))
        if sink:    # exp(lse) / (exp(lse) + exp(sink)); sink +inf: 0, -inf: 1
            inv = inv / (1.0 + jnp.exp(sink_ref[lax.rem(b, sink_ref.shape[0]), r] - lse))

        def accumulate(t, acc):
            w = jnp.exp(lse_p_ref[t, r] - m_safe) * inv
            return acc + w * plgpu.load(out_p_ref.at[t, r], layout=layout)

        acc = lax.fori_loop(start, end, accumulate, plgpu.layout_cast(jnp.zeros((v_dim,), jnp.float32), layout))
        out_ref.at[b, r][...] = acc.astype(out_ref.dtype)
        lse_ref[b, r] = jnp.where(seen, lse, jnp.float32(lse_empty))


def build(*, batch: int, rows: int, v_dim: int, out_dtype, lse_empty: float = -math.inf, sink: bool = False):
    """f(split_offsets [B+1] int32, out_p [T, rows, v] f32, lse_p [T, rows] f32[, sink_rows [G, rows] f32])
    -> (out [B, rows, v], lse [B, rows])."""
    if rows % ROWS_PER_CTA:
        raise ValueError(f"rows={rows}: expected a multiple of {ROWS_PER_CTA}")
    if v_dim % (4 * 128):
        raise ValueError(f"v_dim={v_dim}: expected a multiple of 512 (4 floats x 128 threads)")
    if lse_empty not in (-math.inf, math.inf):
        raise ValueError(f"lse_empty={lse_empty!r}: expected -inf or +inf")
    return plgpu.kernel(
        functools.partial(_kernel, lse_empty=lse_empty, sink=sink),
        out_type=(jax.ShapeDtypeStruct((batch, rows, v_dim), out_dtype),
                  jax.ShapeDtypeStruct((batch, rows), jnp.float32)),
        grid=(batch, rows // ROWS_PER_CTA),
        grid_names=("b", "rt"),
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
    )


@functools.partial(jax.named_call, name="mla_combine_sm90")
def combine(split_offsets, out_p, lse_p, *, out_dtype, sink_rows=None, lse_empty: float = -math.inf):
    """out_p [T, R, v] f32, lse_p [T, R] f32 -> out [B, R, v] out_dtype, lse [B, R] f32. sink_rows [G, R] f32
    (optional): the attention sink of each row of batch b at sink_rows[b % G] (G: KV heads)."""
    kernel = build(batch=split_offsets.shape[0] - 1, rows=out_p.shape[1], v_dim=out_p.shape[2], out_dtype=out_dtype,
                   lse_empty=lse_empty, sink=sink_rows is not None)
    return kernel(split_offsets, out_p, lse_p, *(() if sink_rows is None else (sink_rows,)))
