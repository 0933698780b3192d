"""Shared MLA decode test inputs and the float64 numpy oracle (gathers pages in numpy, per batch, per query)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def make_case(rng, *, lens, s_q=1, heads=16, d=576, page=64, spare_pages=3, dtype=jnp.bfloat16,
              nan_unused=True, max_pages=None):
    """Random q and a shuffled paged cache. Block-table entries past each length point anywhere (random
    page ids, negative, out of range); with nan_unused, pages no sequence uses and the slots past each
    length in a sequence's last page are NaN (as FlashMLA's test does)."""
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
    kv = rng.standard_normal((num_pages, page, 1, d)).astype(np.float32)
    if nan_unused:
        for p in set(range(num_pages)) - used:
            kv[p] = np.nan
        for i, n in enumerate(lens):
            if n % page:
                kv[table[i, n // page], n % page:] = np.nan
    q = rng.standard_normal((b, s_q, heads, d)).astype(np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(kv, dtype), jnp.asarray(table), jnp.asarray(lens))


def numpy_mla(q, kv, table, lens, *, v_dim=512, scale=None, causal=True):
    """float64 oracle: out [B, s_q, H, v], lse [B, H, s_q]; queries seeing nothing get 0 and -inf."""
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv, np.float64)
    table, lens = np.asarray(table), np.asarray(lens)
    b, s_q, h, d = q.shape
    page = kv.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((b, s_q, h, v_dim))
    lse = np.full((b, h, s_q), -np.inf)
    for i in range(b):
        n = int(lens[i])
        keys = np.concatenate([kv[table[i, j], :, 0] for j in range(-(-n // page))] or [np.zeros((0, d))])[:n]
        for t in range(s_q):
            lim = n - s_q + t + 1 if causal else n
            if lim <= 0:
                continue
            k = keys[:lim]
            s = q[i, t] @ k.T * scale                     # [H, lim]
            m = s.max(-1, keepdims=True)
            e = np.exp(s - m)
            lse[i, :, t] = (m[:, 0] + np.log(e.sum(-1)))
            out[i, t] = (e / e.sum(-1, keepdims=True)) @ k[:, :v_dim]
    return out, lse


def numpy_sparse_mla(q, kv, indices, *, v_dim=512, scale=None):
    """float64 oracle of sparse decode: query (i, t) attends to the cache tokens indices[i, t] (flat ids,
    -1 or out of range skipped, repeats counted). out [B, s_q, H, v], lse [B, H, s_q] (-inf: nothing valid)."""
    q = np.asarray(q, np.float64)
    flat = np.asarray(kv, np.float64).reshape(-1, q.shape[-1])
    idx = np.asarray(indices)
    b, s_q, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out, lse = np.zeros((b, s_q, h, v_dim)), np.full((b, h, s_q), -np.inf)
    for i in range(b):
        for t in range(s_q):
            keys = flat[[j for j in idx[i, t] if 0 <= j < len(flat)]]
            if not len(keys):
                continue
            s = q[i, t] @ keys.T * scale                  # [H, k]
            m = s.max(-1, keepdims=True)
            e = np.exp(s - m)
            lse[i, :, t] = m[:, 0] + np.log(e.sum(-1))
            out[i, t] = e / e.sum(-1, keepdims=True) @ keys[:, :v_dim]
    return out, lse
