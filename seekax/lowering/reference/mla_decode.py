"""Plain-JAX oracle for MLA decode over a paged latent KV cache (FlashMLA semantics), float32 math.

Pages are gathered through the block table; keys at or beyond a sequence's length (and any page the
table points to past that length, however garbage) never contribute. Causal with q_len > 1: query i
(0-based of q_len) sees keys j < seq_len - q_len + i + 1, FlashMLA's `tril(diagonal=s_k - s_q)`.
A query that sees no key gets out = 0 and lse = -inf (the log-sum-exp of nothing), which the split
combine treats as an empty partial.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seekax.ir.fp8 import SCALE_BLOCK
from seekax.lowering.reference.fp8_gemm import quantize_fp8


def key_limits(seq_lens, q_len: int, causal: bool):
    """[B, q_len] int32: query i of batch b sees keys j < limit[b, i]."""
    seq = seq_lens.astype(jnp.int32)[:, None]                           # [B, 1]
    if not causal:
        return jnp.broadcast_to(seq, (seq.shape[0], q_len))             # [B, q_len]
    return seq - q_len + 1 + jnp.arange(q_len, dtype=jnp.int32)[None]   # [B, q_len]


def gather_pages(kv_cache, block_table, seq_lens):
    """kv_cache [P, page, 1, D], block_table [B, max_pages] -> [B, max_pages*page, D] in the cache's dtype,
    zero past seq_len (so garbage or NaN in unused pages cannot leak through 0 * NaN)."""
    num_pages, page = kv_cache.shape[0], kv_cache.shape[1]
    b, max_pages = block_table.shape
    used = jnp.arange(max_pages)[None] * page < seq_lens[:, None]       # [B, max_pages]
    ids = jnp.where(used, block_table, 0).clip(0, num_pages - 1)        # [B, max_pages]
    kv = jnp.take(kv_cache[:, :, 0, :], ids, axis=0)                   # [B, max_pages, page, D]
    kv = kv.reshape(b, max_pages * page, kv.shape[-1])                  # [B, S, D]
    valid = jnp.arange(max_pages * page)[None] < seq_lens[:, None]      # [B, S]
    return jnp.where(valid[..., None], kv, jnp.zeros((), kv.dtype))     # [B, S, D]


def attend(q, kv, allowed, v_dim: int, scale: float):
    """q [B, s_q, H, D], kv [B, S, D], allowed [B, s_q, S] bool -> out [B, s_q, H, v] f32, lse [B, H, s_q].
    QK^T takes q and kv in kv's dtype with float32 accumulation (bf16 products are exact in f32); P and
    the P V product stay float32."""
    s = jnp.einsum("bqhd,bkd->bhqk", q.astype(kv.dtype), kv, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) * scale        # [B, H, s_q, S]
    s = jnp.where(allowed[:, None], s, -jnp.inf)                        # [B, H, s_q, S]
    lse = jax.nn.logsumexp(s, axis=-1)                                  # [B, H, s_q], -inf if empty
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])  # [B, H, s_q, S], 0 where masked
    out = jnp.einsum("bhqk,bkv->bqhv", p, kv[..., :v_dim].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)               # [B, s_q, H, v]
    return out, lse


def mla_decode_partial(q, kv_cache, block_table, seq_lens, kv_begin, kv_end, *, v_dim: int,
                       softmax_scale: float, causal: bool):
    """Attention restricted to key positions [kv_begin[b], kv_end[b]): one split's (out f32, lse).
    q: [B, s_q, H, D]; kv_begin/kv_end: [B] int32. Returns out [B, s_q, H, v] f32, lse [B, H, s_q] f32."""
    kv = gather_pages(kv_cache, block_table, seq_lens)                  # [B, S, D]
    pos = jnp.arange(kv.shape[1], dtype=jnp.int32)                      # [S]
    limit = key_limits(seq_lens, q.shape[1], causal)                    # [B, s_q]
    allowed = ((pos[None, None] < limit[..., None])
               & (pos[None, None] >= kv_begin[:, None, None])
               & (pos[None, None] < kv_end[:, None, None]))            # [B, s_q, S]
    return attend(q, kv, allowed, v_dim, softmax_scale)


def mla_decode(q, kv_cache, block_table, seq_lens, *, v_dim: int, softmax_scale: float, causal: bool):
    """q: [B, s_q, H, D] -> out [B, s_q, H, v_dim] in q.dtype, lse [B, H, s_q] float32."""
    kv = gather_pages(kv_cache, block_table, seq_lens)                  # [B, S, D]
    pos = jnp.arange(kv.shape[1], dtype=jnp.int32)                      # [S]
    limit = key_limits(seq_lens, q.shape[1], causal)                    # [B, s_q]
    allowed = pos[None, None] < limit[..., None]                        # [B, s_q, S]
    out, lse = attend(q, kv, allowed, v_dim, softmax_scale)
    return out.astype(q.dtype), lse


def combine_splits(out_parts, lse_parts, split_offsets, *, out_dtype):
    """Merge split-KV partials. out_parts [T, s_q, H, v] f32, lse_parts [T, H, s_q] f32; batch b owns rows
    split_offsets[b] : split_offsets[b+1] (split_offsets [B+1] int32, rows past the last are ignored).
    Returns out [B, s_q, H, v] in out_dtype, lse [B, H, s_q] f32 (-inf and zeros for empty batches)."""
    num_batches = split_offsets.shape[0] - 1
    rows = jnp.arange(out_parts.shape[0], dtype=jnp.int32)                     # [T]
    seg = jnp.searchsorted(split_offsets[1:], rows, side="right").astype(jnp.int32)  # [T], B = unused
    lse_max = jax.ops.segment_max(lse_parts, seg, num_segments=num_batches)     # [B, H, s_q]
    safe_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)                   # [B, H, s_q]
    shift = safe_max[jnp.clip(seg, 0, num_batches - 1)]                         # [T, H, s_q]
    w = jnp.where(seg[:, None, None] < num_batches, jnp.exp(lse_parts - shift), 0.0)  # [T, H, s_q]
    total = jax.ops.segment_sum(w, seg, num_segments=num_batches)               # [B, H, s_q]
    lse = jnp.where(total > 0, safe_max + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)  # [B, H, s_q]
    wt = jnp.transpose(w, (0, 2, 1))[..., None]                                 # [T, s_q, H, 1]
    contrib = jnp.where(wt > 0, wt * out_parts, 0.0)                             # [T, s_q, H, v]
    out = jax.ops.segment_sum(contrib, seg, num_segments=num_batches)           # [B, s_q, H, v]
    norm = jnp.transpose(jnp.where(total > 0, total, 1.0), (0, 2, 1))[..., None]  # [B, s_q, H, 1]
    return (out / norm).astype(out_dtype), lse


def quantize_fp8_latent(kv_cache, *, v_dim: int = 512, tile: int = SCALE_BLOCK):
    """DeepSeek-V3.2's FP8 cache layout: kv_cache [P, page, 1, D] -> latent e4m3 [P, page, 1, v_dim], one
    float32 scale per token and `tile` channels [P, page, 1, v_dim/tile], rope kept as bf16 [P, page, 1, D-v_dim].
    The latent goes through the shared quantiser (`fp8_gemm.quantize_fp8`, per (1, tile) block): an all-zero
    tile gets scale 1e-4 / 448 and zeros, as DeepGEMM's and DeepEP's do."""
    p, page, h, _ = kv_cache.shape
    lat, scale = quantize_fp8(kv_cache[..., :v_dim].reshape(p * page * h, v_dim), (1, tile))   # [N, v], [N, v/t]
    return (lat.reshape(p, page, h, v_dim), scale.reshape(p, page, h, v_dim // tile),
            kv_cache[..., v_dim:].astype(jnp.bfloat16))


def dequantize_fp8_latent(latent_fp8, scales, rope):
    """Inverse of quantize_fp8_latent: -> [P, page, 1, v_dim + rope] float32."""
    p, page, h, v = latent_fp8.shape
    nt = scales.shape[-1]
    lat = latent_fp8.astype(jnp.float32).reshape(p, page, h, nt, v // nt) * scales[..., None]  # [P, pg, 1, nt, t]
    return jnp.concatenate([lat.reshape(p, page, h, v), rope.astype(jnp.float32)], axis=-1)


def mla_decode_sparse(q, kv_cache, indices, *, v_dim: int, softmax_scale: float):
    """FlashMLA's sparse decode: each query attends only to its top-k cache tokens. q [B, s_q, H, D];
    kv_cache [P, page, 1, D]; indices [B, s_q, topk] int32 flat token ids (page * page_size + slot),
    -1 or out of range = skip. -> out [B, s_q, H, v] q.dtype, lse [B, H, s_q] f32 (-inf: nothing valid)."""
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])                                   # [P*page, D]
    valid = (indices >= 0) & (indices < flat.shape[0])                                # [B, s_q, k]
    kv = jnp.take(flat, jnp.where(valid, indices, 0), axis=0).astype(jnp.float32)     # [B, s_q, k, D]
    kv = jnp.where(valid[..., None], kv, 0.0)
    s = jnp.einsum("bqhd,bqkd->bhqk", q.astype(jnp.float32), kv,
                   precision=jax.lax.Precision.HIGHEST) * softmax_scale               # [B, H, s_q, k]
    s = jnp.where(valid[:, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)                                                # [B, H, s_q]
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])              # [B, H, s_q, k]
    out = jnp.einsum("bhqk,bqkv->bqhv", p, kv[..., :v_dim], precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype), lse
