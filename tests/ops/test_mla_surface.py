"""FlashMLA's own test surface on the XLA path, against the float64 oracle: several KV heads and odd head counts,
page sizes other than 64, the attention sink, the lse of a query with no key (`lse_empty`), and for sparse decode
per-query top-k lengths and an extra cache. The kernel's evidence for the same cases is in
tests/lowering/test_mla_decode_sm90.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.lowering.reference.mla_decode import dequantize_fp8_latent, quantize_fp8_latent
from seekax.ops.mla import (mla_decode, mla_decode_fp8, mla_decode_sparse, mla_decode_sparse_fp8,
                            mla_decode_split_xla, mla_metadata)
from seekax.testing import assert_close
from seekax.testing.mla_cases import make_case, numpy_mla, numpy_sparse_mla

INF = math.inf


def _check(out, lse, ref_out, ref_lse):
    assert lse.dtype == jnp.float32
    assert_close(out, ref_out, name="out")                                # bf16: 2/128; float32: 1e-5
    assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4, name="lse")          # also: the same inf positions and signs


def _sink(rng, heads, *, edges=True):
    """A learned logit per head around the scores' scale; with edges, one +inf (output 0) and one -inf (no effect)."""
    sink = rng.standard_normal(heads).astype(np.float32) * 2
    if edges and heads >= 3:
        sink[1], sink[2] = INF, -INF
    return jnp.asarray(sink)


# ------------------------------------------------------------------------------------------------ dense decode
@pytest.mark.parametrize("heads, kv_heads, s_q, causal", [
    (1, 1, 1, True),        # FlashMLA's h_q = 1
    (3, 3, 2, True),        # one query head per KV head
    (9, 3, 2, False),
    (16, 2, 1, True),
    (63, 1, 2, True),       # an odd head count: rows = s_q x 63, padded to whole 64-row tiles by the kernel
    (64, 8, 1, True),       # FlashMLA's h_kv = 8
])
def test_heads_and_kv_heads_match_float64(rng, heads, kv_heads, s_q, causal):
    """Query head h reads KV head h // (heads / kv_heads) (FlashMLA's repeat_interleave), lengths with a page
    boundary, a length-1 and an empty sequence, NaN in unused slots."""
    q, kv, table, seq = make_case(rng, lens=[1, 64, 100, 0], s_q=s_q, heads=heads, kv_heads=kv_heads)
    out, lse = mla_decode(q, kv, table, seq, causal=causal, backend="xla")
    _check(out, lse, *numpy_mla(q, kv, table, seq, causal=causal))


def test_kv_heads_are_independent(rng):
    """Two KV heads equal two one-head problems over their own query heads (no cross-talk)."""
    q, kv, table, seq = make_case(rng, lens=[70, 5], s_q=2, heads=8, kv_heads=2, nan_unused=False)
    out, lse = mla_decode(q, kv, table, seq, backend="xla")
    for g in range(2):
        o, l_ = mla_decode(q[:, :, 4 * g:4 * g + 4], kv[:, :, g:g + 1], table, seq, backend="xla")
        np.testing.assert_array_equal(np.asarray(out[:, :, 4 * g:4 * g + 4], np.float32), np.asarray(o, np.float32))
        np.testing.assert_allclose(np.asarray(lse[:, 4 * g:4 * g + 4]), np.asarray(l_), rtol=1e-6)


@pytest.mark.parametrize("page", [1, 5, 16, 32, 128])
def test_page_sizes_match_float64(rng, page):
    """Caches shared with other engines: pages of 16, 32 and 128 tokens (the kernel's too), and any other size on
    the reference (1, 5). Lengths straddle page and 64-token boundaries; NaN past each length."""
    q, kv, table, seq = make_case(rng, lens=[1, 31, 130, 64], s_q=2, heads=8, page=page)
    out, lse = mla_decode(q, kv, table, seq, backend="xla")
    _check(out, lse, *numpy_mla(q, kv, table, seq))


@pytest.mark.parametrize("page, kv_heads", [(16, 1), (128, 2)])
def test_fp8_page_sizes_and_kv_heads_match_float64(rng, page, kv_heads):
    q, kv, table, seq = make_case(rng, lens=[3, 140], s_q=2, heads=8, page=page, kv_heads=kv_heads)
    cache = quantize_fp8_latent(kv)
    out, lse = mla_decode_fp8(q, *cache, table, seq)
    _check(out, lse, *numpy_mla(q, dequantize_fp8_latent(*cache), table, seq))


def test_split_plan_with_kv_heads_and_sink(rng):
    """The kernel's plan (one batch per sequence and KV head) in plain JAX, with a sink, equals the oracle."""
    q, kv, table, seq = make_case(rng, lens=[1, 200, 0, 65], s_q=2, heads=12, kv_heads=3, page=32)
    sink = _sink(rng, 12)
    meta = mla_metadata(seq, num_parts=5, q_len=2, num_heads=12, kv_heads=3)
    assert meta.block_start.shape == (12,)                                 # batch x KV heads
    out, lse = jax.jit(functools.partial(mla_decode_split_xla, lse_empty=INF))(q, kv, table, seq, meta, attn_sink=sink)
    _check(out, lse, *numpy_mla(q, kv, table, seq, attn_sink=sink, lse_empty=INF))


# ------------------------------------------------------------------------------------------------ attention sink
def test_sink_matches_float64_and_leaves_lse_alone(rng):
    q, kv, table, seq = make_case(rng, lens=[1, 90, 0], s_q=2, heads=6, kv_heads=2, page=16)
    sink = _sink(rng, 6)
    out, lse = mla_decode(q, kv, table, seq, attn_sink=sink, backend="xla")
    _check(out, lse, *numpy_mla(q, kv, table, seq, attn_sink=sink))
    plain_out, plain_lse = mla_decode(q, kv, table, seq, backend="xla")
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))          # lse: the keys' alone
    np.testing.assert_array_equal(np.asarray(out[:, :, 2], np.float32), np.asarray(plain_out[:, :, 2], np.float32))
    assert not np.any(np.asarray(out[:, :, 1], np.float32))                          # +inf: all weight on the sink
    factor = 1 / (1 + np.exp(np.asarray(sink)[0] - np.asarray(plain_lse)[:, 0]))    # [B, s_q]
    seen = np.isfinite(np.asarray(plain_lse)[:, 0])
    np.testing.assert_allclose(np.asarray(out[:, :, 0], np.float32)[seen],
                               (np.asarray(plain_out[:, :, 0], np.float32) * factor[..., None])[seen],
                               rtol=2 / 128, atol=2 / 128)


def test_sink_on_the_fp8_cache(rng):
    q, kv, table, seq = make_case(rng, lens=[70, 2], heads=4, nan_unused=False)
    cache, sink = quantize_fp8_latent(kv), _sink(rng, 4)
    out, lse = mla_decode_fp8(q, *cache, table, seq, attn_sink=sink)
    _check(out, lse, *numpy_mla(q, dequantize_fp8_latent(*cache), table, seq, attn_sink=sink))


# ------------------------------------------------------------------------------------------------ lse_empty
@pytest.mark.parametrize("lse_empty", [-INF, INF])
def test_lse_of_a_query_with_no_key(rng, lse_empty):
    """Length 0, and causal s_q = 2 over a length-1 sequence (query 0 sees nothing): out 0 and lse = lse_empty on
    every variant; a query with keys is unaffected."""
    q, kv, table, seq = make_case(rng, lens=[0, 1, 40], s_q=2, heads=4)
    out, lse = mla_decode(q, kv, table, seq, lse_empty=lse_empty, backend="xla")
    ref_out, ref_lse = numpy_mla(q, kv, table, seq, lse_empty=lse_empty)
    _check(out, lse, ref_out, ref_lse)
    assert np.all(np.asarray(lse)[0] == lse_empty) and np.all(np.asarray(lse)[1, :, 0] == lse_empty)
    assert np.all(np.isfinite(np.asarray(lse)[2]))
    cache = quantize_fp8_latent(jnp.nan_to_num(kv))
    _, lse8 = mla_decode_fp8(q, *cache, table, seq, lse_empty=lse_empty)
    np.testing.assert_array_equal(np.isinf(np.asarray(lse8)), np.isinf(ref_lse))
    idx = jnp.asarray([[[0, 3], [-1, -1]]], jnp.int32)                            # query (0, 1): nothing valid
    for sparse, c in ((mla_decode_sparse, (jnp.nan_to_num(kv),)), (mla_decode_sparse_fp8, cache)):
        _, lse_s = sparse(q[:1], *c, idx, lse_empty=lse_empty)
        assert np.all(np.asarray(lse_s)[0, :, 1] == lse_empty) and np.all(np.isfinite(np.asarray(lse_s)[0, :, 0]))


# ------------------------------------------------------------------------------------------------ sparse decode
def _sparse_case(rng, *, b=2, s_q=2, heads=8, topk=40, pages=5, page=64, extra_pages=7, extra_page=16, topk2=24):
    q = jnp.asarray(rng.standard_normal((b, s_q, heads, 576)), jnp.bfloat16)
    kv = jnp.asarray(rng.standard_normal((pages, page, 1, 576)), jnp.bfloat16)
    extra = jnp.asarray(rng.standard_normal((extra_pages, extra_page, 1, 576)), jnp.bfloat16)
    idx = rng.integers(-1, pages * page + 3, size=(b, s_q, topk)).astype(np.int32)         # -1, out of range
    eidx = rng.integers(-1, extra_pages * extra_page + 3, size=(b, s_q, topk2)).astype(np.int32)
    return q, kv, extra, idx, eidx


@pytest.mark.parametrize("per_query", [False, True])
def test_sparse_topk_length(rng, per_query):
    """Only the first topk_length ids count ([B] as FlashMLA's decode takes it, or [B, s_q] per query token),
    including 0 (nothing) and topk (all)."""
    q, kv, _, idx, _ = _sparse_case(rng)
    length = np.asarray([[40, 0], [7, 33]] if per_query else [0, 17], np.int32)
    out, lse = mla_decode_sparse(q, kv, jnp.asarray(idx), topk_length=jnp.asarray(length))
    _check(out, lse, *numpy_sparse_mla(q, kv, idx, topk_length=length))
    full = np.full_like(length, idx.shape[2])
    _, lse_full = mla_decode_sparse(q, kv, jnp.asarray(idx), topk_length=jnp.asarray(full))
    np.testing.assert_array_equal(np.asarray(lse_full), np.asarray(mla_decode_sparse(q, kv, jnp.asarray(idx))[1]))


def test_sparse_extra_cache_is_one_softmax_over_both(rng):
    """A second cache (its own page size, ids and top-k lengths) joins the first in one softmax; with a sink."""
    q, kv, extra, idx, eidx = _sparse_case(rng)
    length, elength = np.asarray([[40, 3], [0, 21]], np.int32), np.asarray([24, 0], np.int32)
    sink = _sink(rng, 8)
    out, lse = mla_decode_sparse(q, kv, jnp.asarray(idx), topk_length=jnp.asarray(length), extra_kv_cache=extra,
                                 extra_indices=jnp.asarray(eidx), extra_topk_length=jnp.asarray(elength),
                                 attn_sink=sink, lse_empty=INF)
    ref = numpy_sparse_mla(q, kv, idx, topk_length=length, extra_kv=extra, extra_indices=eidx,
                           extra_topk_length=elength, attn_sink=sink, lse_empty=INF)
    _check(out, lse, *ref)
    assert np.all(np.asarray(lse)[1, :, 0] == INF)                     # batch 1, query 0: no id from either cache
    # The union is what one cache holding both sets of tokens gives (extra ids offset past the main cache's).
    n_main, n_extra = kv.shape[0] * 64, extra.shape[0] * 16
    both = jnp.concatenate([kv.reshape(-1, 1, 1, 576), extra.reshape(-1, 1, 1, 576)])
    main_ok = (idx >= 0) & (idx < n_main) & (np.arange(idx.shape[2]) < length[..., None])
    extra_ok = (eidx >= 0) & (eidx < n_extra) & (np.arange(eidx.shape[2]) < elength[:, None, None])
    ids = np.concatenate([np.where(main_ok, idx, -1), np.where(extra_ok, eidx + n_main, -1)], axis=2)
    out1, lse1 = mla_decode_sparse(q, both, jnp.asarray(ids), attn_sink=sink, lse_empty=INF)
    _check(out, lse, np.asarray(out1, np.float32), lse1)


def test_sparse_fp8_with_extra_cache_and_lengths(rng):
    q, kv, extra, idx, eidx = _sparse_case(rng, extra_page=32, extra_pages=3)
    cache, extra8 = quantize_fp8_latent(kv), quantize_fp8_latent(extra)
    length, sink = np.asarray([11, 40], np.int32), _sink(rng, 8, edges=False)
    out, lse = mla_decode_sparse_fp8(q, *cache, jnp.asarray(idx), topk_length=jnp.asarray(length), extra_cache=extra8,
                                     extra_indices=jnp.asarray(eidx), attn_sink=sink)
    _check(out, lse, *numpy_sparse_mla(q, dequantize_fp8_latent(*cache), idx, topk_length=length,
                                       extra_kv=dequantize_fp8_latent(*extra8), extra_indices=eidx, attn_sink=sink))


# ------------------------------------------------------------------------------------------------ bad input
def _dense():
    return (jnp.zeros((2, 1, 8, 64), jnp.float32), jnp.zeros((4, 16, 2, 64), jnp.float32),
            jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32))


@pytest.mark.parametrize("call, match", [
    (lambda a: mla_decode(*a, v_dim=32, attn_sink=jnp.zeros((2,), jnp.float32)), "attn_sink"),   # per query head
    (lambda a: mla_decode(*a, v_dim=32, lse_empty=float("nan")), "lse_empty"),
    (lambda a: mla_decode(a[0][:, :, :7], *a[1:], v_dim=32), "kv_cache.shape"),                  # 7 % 2 KV heads
    (lambda a: mla_decode(*a, v_dim=32, metadata=mla_metadata(a[3], num_parts=2)), "metadata"),   # not per KV head
    (lambda a: mla_metadata(a[3], 132, num_heads=9, kv_heads=2), "num_heads"),
    (lambda a: mla_decode_sparse(a[0], a[1], jnp.zeros((2, 1, 4), jnp.int32), v_dim=32), "kv_cache.shape"),
])
def test_dense_options_check_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(_dense())


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk_length=jnp.zeros((2, 2), jnp.int32)), "topk_length"),                 # neither [B] nor [B, s_q]
    (dict(topk_length=jnp.asarray([5], jnp.int32)), "topk_length"),                  # > topk = 4
    (dict(topk_length=jnp.asarray([-1], jnp.int32)), "topk_length"),
    (dict(topk_length=jnp.zeros((1,), jnp.float32)), "topk_length"),
    (dict(extra_kv_cache=jnp.zeros((2, 16, 1, 64), jnp.float32)), "extra_indices"),  # a cache without its ids
    (dict(extra_indices=jnp.zeros((1, 1, 4), jnp.int32)), "extra_indices"),          # ids without a cache
    (dict(extra_topk_length=jnp.zeros((1,), jnp.int32)), "extra_topk_length"),
    (dict(extra_kv_cache=jnp.zeros((2, 16, 1, 32), jnp.float32), extra_indices=jnp.zeros((1, 1, 4), jnp.int32)),
     "extra_kv_cache"),                                                              # other head dims
    (dict(extra_kv_cache=jnp.zeros((2, 16, 1, 64), jnp.float32), extra_indices=jnp.zeros((1, 2, 4), jnp.int32)),
     "extra_indices.shape"),
])
def test_sparse_options_check_inputs(kwargs, match):
    q, kv = jnp.zeros((1, 1, 4, 64), jnp.float32), jnp.zeros((3, 16, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match=f"^{match}"):
        mla_decode_sparse(q, kv, jnp.zeros((1, 1, 4), jnp.int32), v_dim=32, **kwargs)


def test_sparse_fp8_extra_cache_checks(rng):
    _, kv, _, _ = make_case(rng, lens=[3], heads=4, nan_unused=False)
    q, cache = jnp.zeros((1, 1, 4, 576), jnp.bfloat16), quantize_fp8_latent(kv)
    ids = jnp.zeros((1, 1, 4), jnp.int32)
    with pytest.raises(ValueError, match="^extra_cache="):
        mla_decode_sparse_fp8(q, *cache, ids, extra_cache=cache[0], extra_indices=ids)
    with pytest.raises(ValueError, match="^extra_cache.scales"):
        mla_decode_sparse_fp8(q, *cache, ids, extra_cache=(cache[0], cache[1][..., :2], cache[2]), extra_indices=ids)
