"""Plain-JAX oracle for MLA decode over a paged latent KV cache (FlashMLA semantics), float32 math.

Pages are gathered through the block table; keys at or beyond a sequence's length (and any page the
table points to past that length, however garbage) never contribute. Causal with q_len > 1: query i
(0-based of q_len) sees keys j < seq_len - q_len + i + 1, FlashMLA's `tril(diagonal=s_k - s_q)`.
A query that sees no key gets out = 0 and lse = -inf (the log-sum-exp of nothing), which the split
combine treats as an empty partial (`lse_empty=+inf` reports FlashMLA's value instead). Several KV heads:
query head h reads KV head h // (H / Hkv). An attention sink scales the output by 1 / (1 + exp(sink - lse))
and leaves lse alone.
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


def gather_kv(kv_cache, block_table, seq_lens):
    """kv_cache [P, page, Hkv, D], block_table [B, max_pages] -> [B, max_pages*page, Hkv, D] in the cache's
    dtype, zero past seq_len (so garbage or NaN in unused pages cannot leak through 0 * NaN)."""
    num_pages, page = kv_cache.shape[0], kv_cache.shape[1]
    b, max_pages = block_table.shape
    used = jnp.arange(max_pages)[None] * page < seq_lens[:, None]       # [B, max_pages]
    ids = jnp.where(used, block_table, 0).clip(0, num_pages - 1)        # [B, max_pages]
    kv = jnp.take(kv_cache, ids, axis=0)                               # [B, max_pages, page, Hkv, D]
    kv = kv.reshape(b, max_pages * page, *kv.shape[3:])                 # [B, S, Hkv, D]
    valid = jnp.arange(max_pages * page)[None] < seq_lens[:, None]      # [B, S]
    return jnp.where(valid[..., None, None], kv, jnp.zeros((), kv.dtype))  # [B, S, Hkv, D]


def gather_pages(kv_cache, block_table, seq_lens):
    """One KV head: kv_cache [P, page, 1, D] -> [B, max_pages*page, D], as `gather_kv`."""
    return gather_kv(kv_cache, block_table, seq_lens)[:, :, 0]          # [B, S, D]


def attend(q, kv, allowed, v_dim: int, scale: float):
    """q [B, s_q, H, D], kv [B, S, Hkv, D] (query head h reads KV head h // (H / Hkv)), allowed [B, s_q, S]
    bool -> out [B, s_q, H, v] f32, lse [B, H, s_q]. QK^T takes q and kv in kv's dtype with float32
    accumulation (bf16 products are exact in f32); P and the P V product stay float32."""
    b, s_q, h, d = q.shape
    hkv = kv.shape[2]
    qg = q.astype(kv.dtype).reshape(b, s_q, hkv, h // hkv, d)          # [B, s_q, Hkv, H/Hkv, D]
    s = jnp.einsum("bqgnd,bkgd->bgnqk", qg, kv, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) * scale        # [B, Hkv, H/Hkv, s_q, S]
    s = jnp.where(allowed[:, None, None], s, -jnp.inf)                  # [B, Hkv, H/Hkv, s_q, S]
    lse = jax.nn.logsumexp(s, axis=-1)                                  # [B, Hkv, H/Hkv, s_q], -inf if empty
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])  # [B, Hkv, H/Hkv, s_q, S], 0 where masked
    out = jnp.einsum("bgnqk,bkgv->bqgnv", p, kv[..., :v_dim].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)               # [B, s_q, Hkv, H/Hkv, v]
    return out.reshape(b, s_q, h, v_dim), lse.reshape(b, h, s_q)


def apply_sink(out, lse, attn_sink):
    """The attention sink (a learned logit per head added to the softmax denominator): out [B, s_q, H, v] f32
    times exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)); lse [B, H, s_q] stays the log-sum-exp
    of the keys alone (FlashMLA's contract). sink [H] float32; +inf zeroes the output, -inf changes nothing;
    a query with no key keeps out = 0. attn_sink None: out unchanged."""
    if attn_sink is None:
        return out
    seen = lse > -jnp.inf                                                              # [B, H, s_q]
    gap = attn_sink.astype(jnp.float32)[None, :, None] - jnp.where(seen, lse, 0.0)     # [B, H, s_q]
    factor = jnp.where(seen, 1.0 / (1.0 + jnp.exp(gap)), 0.0)                         # [B, H, s_q]
    return out * jnp.transpose(factor, (0, 2, 1))[..., None]                          # [B, s_q, H, v]


def fill_empty_lse(lse, lse_empty: float):
    """lse [B, H, s_q]: a query with no key has lse = -inf (the log-sum-exp of nothing); `lse_empty` = +inf
    reports FlashMLA's value there instead."""
    return lse if lse_empty == -jnp.inf else jnp.where(lse == -jnp.inf, jnp.float32(lse_empty), lse)


def mla_decode_partial(q, kv_cache, block_table, seq_lens, kv_begin, kv_end, *, v_dim: int,
                       softmax_scale: float, causal: bool):
    """Attention restricted to key positions [kv_begin[b], kv_end[b]): one split's (out f32, lse).
    q: [B, s_q, H, D]; kv_begin/kv_end: [B] int32. Returns out [B, s_q, H, v] f32, lse [B, H, s_q] f32."""
    kv = gather_kv(kv_cache, block_table, seq_lens)                     # [B, S, Hkv, D]
    pos = jnp.arange(kv.shape[1], dtype=jnp.int32)                      # [S]
    limit = key_limits(seq_lens, q.shape[1], causal)                    # [B, s_q]
    allowed = ((pos[None, None] < limit[..., None])
               & (pos[None, None] >= kv_begin[:, None, None])
               & (pos[None, None] < kv_end[:, None, None]))            # [B, s_q, S]
    return attend(q, kv, allowed, v_dim, softmax_scale)


def mla_decode(q, kv_cache, block_table, seq_lens, *, v_dim: int, softmax_scale: float, causal: bool,
               attn_sink=None, lse_empty: float = -jnp.inf):
    """q: [B, s_q, H, D], kv_cache [P, page, Hkv, D] -> out [B, s_q, H, v_dim] in q.dtype, lse [B, H, s_q]
    float32 (without the sink; `lse_empty` for a query that sees no key)."""
    kv = gather_kv(kv_cache, block_table, seq_lens)                     # [B, S, Hkv, D]
    pos = jnp.arange(kv.shape[1], dtype=jnp.int32)                      # [S]
    limit = key_limits(seq_lens, q.shape[1], causal)                    # [B, s_q]
    allowed = pos[None, None] < limit[..., None]                        # [B, s_q, S]
    out, lse = attend(q, kv, allowed, v_dim, softmax_scale)
    return apply_sink(out, lse, attn_sink).astype(q.dtype), fill_empty_lse(lse, lse_empty)


def one_kv_head(q, kv_cache, block_table, seq_lens):
    """The same problem with one KV head, one "batch" per (sequence, KV head) as the kernel and the split plan
    run it: q [B, s_q, H, D] -> [B*Hkv, s_q, H/Hkv, D]; kv_cache [P, page, Hkv, D] -> [Hkv*P, page, 1, D]
    (head g's pages at g*P); block_table -> [B*Hkv, max_pages]; seq_lens -> [B*Hkv]. Hkv = 1: unchanged."""
    b, s_q, h, d = q.shape
    num_pages, page, hkv, _ = kv_cache.shape
    if hkv == 1:
        return q, kv_cache, block_table, seq_lens
    q1 = jnp.transpose(q.reshape(b, s_q, hkv, h // hkv, d), (0, 2, 1, 3, 4)).reshape(b * hkv, s_q, h // hkv, d)
    kv1 = jnp.transpose(kv_cache, (2, 0, 1, 3)).reshape(hkv * num_pages, page, 1, d)              # [Hkv*P, page, 1, D]
    table1 = (block_table[:, None] + num_pages * jnp.arange(hkv, dtype=jnp.int32)[None, :, None])  # [B, Hkv, max_p]
    return q1, kv1, table1.reshape(b * hkv, -1), jnp.repeat(seq_lens, hkv)


def merge_kv_heads(out, lse, *, kv_heads: int):
    """Inverse of `one_kv_head` on the outputs: out [B*Hkv, s_q, H/Hkv, v] -> [B, s_q, H, v], lse [B*Hkv, H/Hkv,
    s_q] -> [B, H, s_q] (query head g * H/Hkv + n is KV head g's n-th)."""
    if kv_heads == 1:
        return out, lse
    bg, s_q, n, v = out.shape
    out = jnp.transpose(out.reshape(bg // kv_heads, kv_heads, s_q, n, v), (0, 2, 1, 3, 4))
    return out.reshape(bg // kv_heads, s_q, kv_heads * n, v), lse.reshape(bg // kv_heads, kv_heads * n, s_q)


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


def valid_ids(indices, tokens: int, topk_length=None):
    """indices [B, s_q, k] int32 flat token ids into a cache of `tokens` -> [B, s_q, k] bool: in range
    (not -1, not past the cache) and, with topk_length ([B] or [B, s_q] int32), among the first topk_length."""
    valid = (indices >= 0) & (indices < tokens)                                       # [B, s_q, k]
    if topk_length is not None:
        length = topk_length if topk_length.ndim == 2 else topk_length[:, None]       # [B, s_q] or [B, 1]
        valid &= jnp.arange(indices.shape[2], dtype=jnp.int32)[None, None] < length[..., None]
    return valid


def gather_ids(kv_cache, indices, valid):
    """kv_cache [P, page, 1, D], indices/valid [B, s_q, k] -> rows [B, s_q, k, D] float32, zero where invalid."""
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])                                   # [P*page, D]
    kv = jnp.take(flat, jnp.where(valid, indices, 0), axis=0).astype(jnp.float32)     # [B, s_q, k, D]
    return jnp.where(valid[..., None], kv, 0.0)


def mla_decode_sparse(q, kv_cache, indices, *, v_dim: int, softmax_scale: float, topk_length=None,
                      extra_kv_cache=None, extra_indices=None, extra_topk_length=None, attn_sink=None,
                      lse_empty: float = -jnp.inf):
    """FlashMLA's sparse decode: each query attends only to its top-k cache tokens. q [B, s_q, H, D];
    kv_cache [P, page, 1, D]; indices [B, s_q, topk] int32 flat token ids (page * page_size + slot),
    -1 or out of range = skip, and with topk_length ([B] or [B, s_q]) only the first topk_length count.
    extra_kv_cache [P2, page2, 1, D] with extra_indices [B, s_q, topk2] (and extra_topk_length): more tokens,
    one softmax over the union. -> out [B, s_q, H, v] q.dtype, lse [B, H, s_q] f32 (without the sink;
    `lse_empty` where nothing is valid)."""
    valid = valid_ids(indices, kv_cache.shape[0] * kv_cache.shape[1], topk_length)    # [B, s_q, k]
    kv = gather_ids(kv_cache, indices, valid)                                         # [B, s_q, k, D]
    if extra_kv_cache is not None:
        extra = valid_ids(extra_indices, extra_kv_cache.shape[0] * extra_kv_cache.shape[1], extra_topk_length)
        kv = jnp.concatenate([kv, gather_ids(extra_kv_cache, extra_indices, extra)], axis=2)  # [B, s_q, k+k2, D]
        valid = jnp.concatenate([valid, extra], axis=2)                              # [B, s_q, k+k2]
    s = jnp.einsum("bqhd,bqkd->bhqk", q.astype(jnp.float32), kv,
                   precision=jax.lax.Precision.HIGHEST) * softmax_scale               # [B, H, s_q, k]
    s = jnp.where(valid[:, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)                                                # [B, H, s_q]
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])              # [B, H, s_q, k]
    out = jnp.einsum("bhqk,bqkv->bqhv", p, kv[..., :v_dim], precision=jax.lax.Precision.HIGHEST)
    return apply_sink(out, lse, attn_sink).astype(q.dtype), fill_empty_lse(lse, lse_empty)
