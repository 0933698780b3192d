"""Shared MLA decode test inputs and the float64 numpy oracle (gathers pages in numpy, per batch, per query)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def make_case(rng, *, lens, s_q=1, heads=16, d=576, page=64, spare_pages=3, dtype=jnp.bfloat16,
              nan_unused=True, max_pages=None, kv_heads=1):
    """Random q [B, s_q, heads, d] and a shuffled paged cache [pages, page, kv_heads, d]. Block-table entries
    past each length point anywhere (random page ids, negative, out of range); with nan_unused, pages no
    sequence uses and the slots past each length in a sequence's last page are NaN (as FlashMLA's test does)."""
    lens = np.asarray(lens, np.int32)
    b = len(lens)
    need = [-(-int(n) // page) for n in lens]
    max_pages = max_pages or max(max(need), 1) + 1
    num_pages = sum(need) + spare_pages
    perm = rng.permutation(num_pages)
    table = rng.integers(-5, num_pages + 100, size=(b, max_pages)).astype(np.int32)  # garbage by default
    used, at = set(), 0
    for i, n in enumerate(need):
        table[i, :n] = perm[at:at + n]
        used.update(perm[at:at + n].tolist())
        at += n
    kv = rng.standard_normal((num_pages, page, kv_heads, d)).astype(np.float32)
    if nan_unused:
        for p in set(range(num_pages)) - used:
            kv[p] = np.nan
        for i, n in enumerate(lens):
            if n % page:
                kv[table[i, n // page], n % page:] = np.nan
    q = rng.standard_normal((b, s_q, heads, d)).astype(np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(kv, dtype), jnp.asarray(table), jnp.asarray(lens))


def _softmax_rows(s, keys, v_dim, sink):
    """s [H, n] scores over keys [H or 1, n, d] -> (out [H, v], lse [H]) with the sink [H] (or None) in the
    denominator only; lse is that of the keys alone."""
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    denom = e.sum(-1, keepdims=True)
    if sink is not None:
        denom = denom + np.exp(np.asarray(sink, np.float64)[:, None] - m)
    out = np.einsum("hn,hnv->hv", e / denom, np.broadcast_to(keys[..., :v_dim], (len(s), *keys.shape[1:-1], v_dim)))
    return out, m[:, 0] + np.log(e.sum(-1))


def numpy_mla(q, kv, table, lens, *, v_dim=512, scale=None, causal=True, attn_sink=None, lse_empty=-np.inf):
    """float64 oracle: out [B, s_q, H, v], lse [B, H, s_q]; kv [pages, page, Hkv, d], query head h reads KV head
    h // (H / Hkv). A query seeing nothing gets 0 and `lse_empty`. attn_sink [H]: out scaled by the sink term
    in the denominator, lse without it."""
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv, np.float64)
    table, lens = np.asarray(table), np.asarray(lens)
    b, s_q, h, d = q.shape
    page, hkv = kv.shape[1], kv.shape[2]
    group = np.arange(h) // (h // hkv)                    # [H] the KV head of each query head
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((b, s_q, h, v_dim))
    lse = np.full((b, h, s_q), lse_empty, np.float64)
    for i in range(b):
        n = int(lens[i])
        keys = np.concatenate([kv[table[i, j]] for j in range(-(-n // page))] or [np.zeros((0, hkv, d))])[:n]
        for t in range(s_q):
            lim = n - s_q + t + 1 if causal else n
            if lim <= 0:
                continue
            k = keys[:lim].transpose(1, 0, 2)[group]      # [H, lim, d]
            s = np.einsum("hd,hnd->hn", q[i, t], k) * scale
            out[i, t], lse[i, :, t] = _softmax_rows(s, k, v_dim, attn_sink)
    return out, lse


def numpy_sparse_mla(q, kv, indices, *, v_dim=512, scale=None, topk_length=None, extra_kv=None, extra_indices=None,
                     extra_topk_length=None, attn_sink=None, lse_empty=-np.inf):
    """float64 oracle of sparse decode: query (i, t) attends to the cache tokens indices[i, t] (flat ids,
    -1 or out of range skipped, repeats counted; with topk_length [B] or [B, s_q] only the first that many),
    plus extra_indices[i, t] into extra_kv the same way: one softmax over both. out [B, s_q, H, v], lse
    [B, H, s_q] (`lse_empty`: nothing valid). attn_sink [H]: in the denominator only."""
    q = np.asarray(q, np.float64)
    b, s_q, h, d = q.shape

    def picked(cache, idx, length, i, t):
        if cache is None:
            return np.zeros((0, d))
        flat = np.asarray(cache, np.float64).reshape(-1, d)
        ids = np.asarray(idx)[i, t]
        if length is not None:
            length = np.asarray(length)
            ids = ids[:int(length[i, t] if length.ndim == 2 else length[i])]
        return flat[[j for j in ids if 0 <= j < len(flat)]]

    scale = d ** -0.5 if scale is None else scale
    out, lse = np.zeros((b, s_q, h, v_dim)), np.full((b, h, s_q), lse_empty, np.float64)
    for i in range(b):
        for t in range(s_q):
            keys = np.concatenate([picked(kv, indices, topk_length, i, t),
                                   picked(extra_kv, extra_indices, extra_topk_length, i, t)])
            if not len(keys):
                continue
            s = q[i, t] @ keys.T * scale                  # [H, k]
            out[i, t], lse[i, :, t] = _softmax_rows(s, keys[None], v_dim, attn_sink)
    return out, lse
