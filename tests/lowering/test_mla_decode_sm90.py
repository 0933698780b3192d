"""The MLA decode Mosaic GPU kernel, bf16 cache and DeepSeek-V3.2's FP8 cache: interpret-mode numerics (race
detector on) against the float64 oracle, Hopper cross-lowering at FlashMLA's benchmark shapes, on-GPU checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.ir.mla_tiling import MlaTileConfig
from seekax.ir.tiling import SharedMemoryBudgetExceeded
from seekax.lowering.reference.mla_decode import dequantize_fp8_latent, quantize_fp8_latent
from seekax.ops.mla import mla_decode, mla_decode_fp8, mla_decode_sparse, mla_decode_sparse_fp8, mla_metadata
from seekax.testing import assert_close, cross_lower, interpret_mode, rel_err

from seekax.testing.mla_cases import make_case, numpy_mla, numpy_sparse_mla  # noqa: E402


def _check(out, lse, q, kv, table, seq, causal=True):
    ref_out, ref_lse = numpy_mla(q, kv, table, seq, causal=causal)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3, name="lse")      # fp32 statistics, exp2 with approx math
    assert_close(out, ref_out, rtol=2 / 128, atol=2 / 128, name="out")  # bf16 P and output: ~2 ulp


@pytest.mark.parametrize("lens, s_q, heads, parts, causal, combine", [
    ([1, 64, 128, 77], 1, 16, 3, True, "kernel"),       # length 1, page boundaries, splits across sequences
    ([130, 2, 1, 0, 65], 2, 16, 5, True, "kernel"),     # s_q = 2 causal (query 0 of length 1 sees nothing), empty
    ([200, 129], 1, 64, 4, True, "xla"),                # 64 heads = one full row tile; long sequences split
    ([70, 3], 2, 32, 2, False, "kernel"),               # non-causal s_q = 2
    ([66, 1], 2, 64, 2, True, "kernel"),                # two row tiles (rows = s_q x 64 heads): tile 1 is query 1
])
def test_interpret_matches_float64(rng, lens, s_q, heads, parts, causal, combine):
    q, kv, table, seq = make_case(rng, lens=lens, s_q=s_q, heads=heads)   # NaN unused pages and tails, garbage table
    meta = mla_metadata(seq, num_parts=parts)
    with interpret_mode(detect_races=True):
        out, lse = mla_decode(q, kv, table, seq, causal=causal, metadata=meta, backend="interpret",
                              config=MlaTileConfig(combine=combine))
        out.block_until_ready()
    _check(out, lse, q, kv, table, seq, causal)


def _bench_args(b, s_k, h, s_q):
    return (jax.ShapeDtypeStruct((b, s_q, h, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((b * s_k // 64, 64, 1, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s_k // 64 + 2), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32))


@pytest.mark.parametrize("h, s_q", [(128, 1), (128, 2), (16, 1)])
def test_cross_lowers_at_benchmark_shapes(h, s_q):
    lowered = cross_lower(functools.partial(mla_decode, backend="mosaic"), *_bench_args(128, 4096, h, s_q))
    report, combine = lowered.reports                                        # decode kernel, combine kernel
    assert report.fits_smem and report.tma and combine.smem_bytes == 0
    assert np.prod(combine.grid) == 128 * -(-h * s_q // 64)                  # one CTA per (batch, row tile)
    assert report.smem_bytes == MlaTileConfig().smem_bytes()               # the account in ir/mla_tiling.py is exact
    assert "m64n64k16.f32.bf16.bf16" in report.wgmma                       # S = Q K^T, one 64-key page
    assert "m64n256k16.f32.bf16.bf16" in report.wgmma                      # P V, half of 512 per warpgroup
    assert report.threads == (384, 1, 1)                                    # softmax wg, value wg, TMA wg
    tiles = -(-h * s_q // 64)
    assert np.prod(report.grid) == tiles * (132 // tiles)                   # row tiles x parts fill H200's SMs


def test_three_stages_overflow_is_a_typed_error():
    with pytest.raises(SharedMemoryBudgetExceeded):
        cross_lower(functools.partial(mla_decode, backend="mosaic", config=MlaTileConfig(stages=3)),
                    *_bench_args(2, 256, 64, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["bf16", "fp8", "sparse", "sparse_fp8"])
@pytest.mark.parametrize("s_q", [1, 2])
def test_on_hopper(rng, s_q, cache):
    lens = rng.integers(1, 1500, size=16).tolist() + [1, 64, 0]
    q, kv, table, seq = make_case(rng, lens=lens, s_q=s_q, heads=128)
    if cache.startswith("sparse"):
        kv = jnp.nan_to_num(kv)                                              # every token may be picked
        idx = rng.integers(-1, kv.shape[0] * 64, size=(len(lens), s_q, 2048)).astype(np.int32)
        idx[-1] = -1                                                         # nothing valid
        if cache == "sparse_fp8":
            fp8 = quantize_fp8_latent(kv)
            decode = functools.partial(mla_decode_sparse_fp8, q, *fp8, jnp.asarray(idx))
            kv = dequantize_fp8_latent(*fp8).astype(jnp.bfloat16)           # the kernel's exact inputs
        else:
            decode = functools.partial(mla_decode_sparse, q, kv, jnp.asarray(idx))
        check = functools.partial(_check_sparse, q=q, kv=kv, idx=idx)
    elif cache == "fp8":
        fp8 = quantize_fp8_latent(kv)
        decode = functools.partial(mla_decode_fp8, q, *fp8, table, seq)
        check = functools.partial(_check_fp8, q=q, cache=fp8, table=table, seq=seq)  # includes the XLA FP8 path
    else:
        decode = functools.partial(mla_decode, q, kv, table, seq)
        check = functools.partial(_check, q=q, kv=kv, table=table, seq=seq)
    out, lse = decode(backend="mosaic")
    out2, _ = decode(backend="mosaic")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))     # deterministic: no races
    check(out, lse)
    if cache != "fp8":                                                   # _check_fp8 compared with XLA already
        assert rel_err(out, decode(backend="xla")[0]) < 1e-2


# ------------------------------------------------------------------------------------------------ FP8 cache
def _check_fp8(out, lse, q, cache, table, seq, causal=True):
    """The kernel dequantises each page to bf16 before the wgmma, so the exact model of its inputs is the
    bf16-rounded dequantised cache: same tolerances as the bf16 kernel against that. Against the float32
    dequantisation (the XLA path) the extra bf16 rounding of K and V adds ~1e-3 relative."""
    deq = dequantize_fp8_latent(*cache)
    _check(out, lse, q, deq.astype(jnp.bfloat16), table, seq, causal)
    xo, xl = mla_decode_fp8(q, *cache, table, seq, causal=causal, backend="xla")
    seen = np.isfinite(xl)                                                   # -inf: a query that sees no key
    assert rel_err(out, xo) < 1e-2 and rel_err(np.where(seen, lse, 0), np.where(seen, xl, 0)) < 1e-3


@pytest.mark.parametrize("lens, s_q, heads, parts, causal, combine", [
    ([1, 64, 130, 77], 2, 16, 3, True, "kernel"),       # length 1, page boundaries, s_q = 2, splits
    ([200, 0, 129], 1, 64, 4, True, "xla"),             # a full row tile, an empty sequence, long splits
    ([66, 5], 2, 64, 2, False, "kernel"),               # two row tiles, non-causal
])
def test_fp8_interpret_matches_float64(rng, lens, s_q, heads, parts, causal, combine):
    q, kv, table, seq = make_case(rng, lens=lens, s_q=s_q, heads=heads)   # NaN tails: NaN scales and latents
    cache = quantize_fp8_latent(kv)
    meta = mla_metadata(seq, num_parts=parts, q_len=s_q, num_heads=heads)
    with interpret_mode(detect_races=True):
        out, lse = mla_decode_fp8(q, *cache, table, seq, causal=causal, metadata=meta, backend="interpret",
                                  config=MlaTileConfig(stages=1, combine=combine))
        out.block_until_ready()
    _check_fp8(out, lse, q, cache, table, seq, causal)


def _fp8_bench_args(b, s_k, h, s_q):
    pages = b * s_k // 64
    return (jax.ShapeDtypeStruct((b, s_q, h, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((pages, 64, 1, 512), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((pages, 64, 1, 4), jnp.float32),
            jax.ShapeDtypeStruct((pages, 64, 1, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s_k // 64 + 2), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32))


@pytest.mark.parametrize("h, s_q", [(128, 1), (16, 2)])
def test_fp8_cross_lowers_at_benchmark_shapes(h, s_q):
    lowered = cross_lower(functools.partial(mla_decode_fp8, backend="mosaic"), *_fp8_bench_args(128, 4096, h, s_q))
    report, _ = lowered.reports
    assert report.fits_smem and report.tma and report.threads == (384, 1, 1)
    assert report.smem_bytes == MlaTileConfig(stages=1).smem_bytes("float8_e4m3fn")   # the account is exact
    assert "m64n64k16.f32.bf16.bf16" in report.wgmma and "m64n256k16.f32.bf16.bf16" in report.wgmma


def test_fp8_two_slots_overflow_is_a_typed_error():
    assert MlaTileConfig(stages=2).smem_bytes("float8_e4m3fn") > 227 * 1024
    with pytest.raises(SharedMemoryBudgetExceeded):
        cross_lower(functools.partial(mla_decode_fp8, backend="mosaic", config=MlaTileConfig(stages=2)),
                    *_fp8_bench_args(2, 256, 64, 1))


# ------------------------------------------------------------------------------------------------ sparse (top-k)
def _sparse_case(rng, b, s_q, heads, topk, pages=6):
    kv = jnp.asarray(rng.standard_normal((pages, 64, 1, 576)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((b, s_q, heads, 576)), jnp.bfloat16)
    idx = rng.integers(0, pages * 64, size=(b, s_q, topk)).astype(np.int32)
    return q, kv, idx


def _check_sparse(out, lse, q, kv, idx):
    ref_out, ref_lse = numpy_sparse_mla(q, kv, idx)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3, name="lse")
    assert_close(out, ref_out, rtol=2 / 128, atol=2 / 128, name="out")


def _sparse_edges(idx, kv):
    """Skipped ids (-1, out of range), a repeated id, a query with none valid (s_q > 1), and every token no
    query picks set to NaN (so reading one would show)."""
    idx[0, 0, 3:9] = -1                          # skipped: the valid ids behind them move up
    idx[0, 0, 20] = kv.shape[0] * 64 + 5         # out of range: skipped
    idx[0, 0, 21] = idx[0, 0, 22]                # a repeated token counts twice, as in the reference
    if idx.shape[1] > 1:
        idx[-1, 1, :] = -1                       # nothing valid: out 0, lse -inf
    flat = np.asarray(kv, np.float32).reshape(-1, 576)
    flat[np.setdiff1d(np.arange(len(flat)), idx[(idx >= 0) & (idx < len(flat))])] = np.nan  # never picked
    return idx, jnp.asarray(flat.reshape(kv.shape), jnp.bfloat16)


@pytest.mark.parametrize("b, s_q, heads, topk, parts", [
    (2, 2, 16, 100, 3),     # topk not a multiple of 64 (a partial last step), splits across query tokens
    (1, 1, 64, 200, 2),     # one full row tile, four steps split over two parts
    (1, 2, 128, 70, 4),     # two row tiles (128 heads) x two parts
])
def test_sparse_interpret_matches_float64(rng, b, s_q, heads, topk, parts):
    q, kv, idx = _sparse_case(rng, b, s_q, heads, topk)
    idx, kv = _sparse_edges(idx, kv)
    with interpret_mode(detect_races=True):
        out, lse = mla_decode_sparse(q, kv, jnp.asarray(idx), backend="interpret", num_sms=parts)
        out.block_until_ready()
    _check_sparse(out, lse, q, kv, idx)


@pytest.mark.parametrize("b, s_q, heads, topk, parts", [
    (2, 2, 16, 100, 3),     # partial last step, splits across query tokens, a query with nothing valid
    (1, 1, 128, 130, 4),    # two row tiles x two parts, three steps
])
def test_sparse_fp8_interpret_matches_float64(rng, b, s_q, heads, topk, parts):
    q, kv, idx = _sparse_case(rng, b, s_q, heads, topk)
    idx, kv = _sparse_edges(idx, kv)
    cache = quantize_fp8_latent(kv)                                  # never-picked tokens: NaN latents and scales
    with interpret_mode(detect_races=True):
        out, lse = mla_decode_sparse_fp8(q, *cache, jnp.asarray(idx), backend="interpret", num_sms=parts)
        out.block_until_ready()
    _check_sparse(out, lse, q, dequantize_fp8_latent(*cache).astype(jnp.bfloat16), idx)  # the kernel's exact inputs
    xo, xl = mla_decode_sparse_fp8(q, *cache, jnp.asarray(idx), backend="xla")
    seen = np.isfinite(xl)
    assert rel_err(out, xo) < 1e-2 and rel_err(np.where(seen, lse, 0), np.where(seen, xl, 0)) < 1e-3


@pytest.mark.parametrize("h, s_q", [(128, 1), (64, 2)])
def test_sparse_cross_lowers_at_v32_shapes(h, s_q):
    """DeepSeek-V3.2's decode: top-2048 tokens per query out of a 32 K-token cache per sequence."""
    b, topk, tokens = 64, 2048, 64 * 32768
    args = (jax.ShapeDtypeStruct((b, s_q, h, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((tokens // 64, 64, 1, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s_q, topk), jnp.int32))
    lowered = cross_lower(functools.partial(mla_decode_sparse, backend="mosaic"), *args)
    report, _ = lowered.reports
    assert report.fits_smem and report.tma and report.threads == (384, 1, 1)
    assert report.smem_bytes == MlaTileConfig(stages=1).smem_bytes(sparse=True)     # the account is exact
    assert "m64n64k16.f32.bf16.bf16" in report.wgmma and "m64n256k16.f32.bf16.bf16" in report.wgmma
    fp8_args = _fp8_bench_args(b, tokens // b, h, s_q)[:4] + (args[2],)        # q, latent, scales, rope, indices
    report8, _ = cross_lower(functools.partial(mla_decode_sparse_fp8, backend="mosaic"), *fp8_args).reports
    assert report8.fits_smem and report8.tma and report8.threads == (384, 1, 1)
    assert report8.smem_bytes == MlaTileConfig(stages=1).smem_bytes("float8_e4m3fn", sparse=True)
    assert "m64n64k16.f32.bf16.bf16" in report8.wgmma and "m64n256k16.f32.bf16.bf16" in report8.wgmma


def test_sparse_two_slots_overflow_is_a_typed_error():
    assert MlaTileConfig(stages=2).smem_bytes(sparse=True) > 227 * 1024
    with pytest.raises(SharedMemoryBudgetExceeded):
        cross_lower(functools.partial(mla_decode_sparse, backend="mosaic", config=MlaTileConfig(stages=2)),
                    jax.ShapeDtypeStruct((1, 1, 64, 576), jnp.bfloat16),
                    jax.ShapeDtypeStruct((4, 64, 1, 576), jnp.bfloat16),
                    jax.ShapeDtypeStruct((1, 1, 128), jnp.int32))


def test_interpret_backend_without_an_outer_interpret_mode(rng):
    """backend="interpret" alone (no seekax.testing.interpret_mode around it) runs the decode kernel and the
    combine kernel, each under its own interpreter context (one context object entered twice used to fail)."""
    q, kv, table, seq = make_case(rng, lens=[3, 70], s_q=1, heads=16)
    out, lse = mla_decode(q, kv, table, seq, metadata=mla_metadata(seq, num_parts=2), backend="interpret")
    _check(out, lse, q, kv, table, seq)


# ------------------------------------------------------------------------------------------------ FlashMLA's surface
# Several KV heads, odd head counts, pages of 16 / 32 / 128 tokens, the attention sink (in the combine), lse_empty,
# and for sparse decode per-query top-k lengths and an extra cache (a second gather source in the kernel).
INF = float("inf")


def _sink(rng, heads):
    """One logit per head; heads 1 and 2 (when there) at +inf (output 0) and -inf (no effect)."""
    sink = rng.standard_normal(heads).astype(np.float32) * 2
    sink[1:3] = [INF, -INF][:len(sink[1:3])]
    return jnp.asarray(sink)


@pytest.mark.parametrize("lens, s_q, heads, kv_heads, page, parts, combine, lse_empty", [
    ([70, 0], 2, 32, 2, 32, 3, "kernel", INF),          # 2 KV heads x 16, 2 pages a step, an empty sequence
    ([130, 5], 1, 9, 3, 128, 2, "xla", -INF),           # 3 KV heads x 3 (odd) heads, a page holds 2 steps
    ([1, 64, 100], 2, 16, 1, 16, 3, "kernel", INF),     # 4 pages a step; query 0 of length 1 sees nothing
])
def test_interpret_kv_heads_pages_sink(rng, lens, s_q, heads, kv_heads, page, parts, combine, lse_empty):
    q, kv, table, seq = make_case(rng, lens=lens, s_q=s_q, heads=heads, kv_heads=kv_heads, page=page)
    sink = _sink(rng, heads)
    meta = mla_metadata(seq, num_parts=parts, q_len=s_q, num_heads=heads, kv_heads=kv_heads)
    with interpret_mode(detect_races=True):
        out, lse = mla_decode(q, kv, table, seq, metadata=meta, backend="interpret", attn_sink=sink,
                              lse_empty=lse_empty, config=MlaTileConfig(combine=combine))
        out.block_until_ready()
    ref_out, ref_lse = numpy_mla(q, kv, table, seq, attn_sink=sink, lse_empty=lse_empty)
    assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3, name="lse")           # lse_empty where nothing is seen
    assert_close(out, ref_out, rtol=2 / 128, atol=2 / 128, name="out")


@pytest.mark.parametrize("lens, s_q, heads, kv_heads, page, combine", [
    ([70, 0], 2, 32, 2, 16, "kernel"),        # pages shorter than a step: scales gathered per batch; 2 KV heads
    ([150, 3], 1, 16, 1, 128, "xla"),         # a step's scales are half a page's row
])
def test_fp8_interpret_kv_heads_pages_sink(rng, lens, s_q, heads, kv_heads, page, combine):
    q, kv, table, seq = make_case(rng, lens=lens, s_q=s_q, heads=heads, kv_heads=kv_heads, page=page)
    cache, sink = quantize_fp8_latent(kv), _sink(rng, heads)                # NaN tails: NaN scales and latents
    meta = mla_metadata(seq, num_parts=3, q_len=s_q, num_heads=heads, kv_heads=kv_heads)
    with interpret_mode(detect_races=True):
        out, lse = mla_decode_fp8(q, *cache, table, seq, metadata=meta, backend="interpret", attn_sink=sink,
                                  lse_empty=INF, config=MlaTileConfig(stages=1, combine=combine))
        out.block_until_ready()
    deq = dequantize_fp8_latent(*cache).astype(jnp.bfloat16)                 # the kernel's exact inputs
    ref_out, ref_lse = numpy_mla(q, deq, table, seq, attn_sink=sink, lse_empty=INF)
    assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3, name="lse")
    assert_close(out, ref_out, rtol=2 / 128, atol=2 / 128, name="out")


def _sparse_extra_case(rng, b=2, s_q=2, heads=16, topk=70, topk2=40):
    """A main cache of 64-token pages and an extra one of 16-token pages, ids with -1 and out-of-range entries;
    top-k lengths that leave query (1, 0) with nothing from either cache."""
    kv = jnp.asarray(rng.standard_normal((5, 64, 1, 576)), jnp.bfloat16)
    extra = jnp.asarray(rng.standard_normal((7, 16, 1, 576)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((b, s_q, heads, 576)), jnp.bfloat16)
    idx = rng.integers(-1, 5 * 64 + 3, size=(b, s_q, topk)).astype(np.int32)
    eidx = rng.integers(-1, 7 * 16 + 3, size=(b, s_q, topk2)).astype(np.int32)
    return q, kv, extra, idx, eidx


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_interpret_topk_length_extra_cache_sink(rng, fp8):
    """Per-query lengths ([B, s_q]; FP8: [B]) on both caches, one softmax over the union, sink, lse_empty +inf."""
    q, kv, extra, idx, eidx = _sparse_extra_case(rng)
    length = np.asarray([[70, 13], [0, 64]] if not fp8 else [41, 0], np.int32)
    elength = np.asarray([40, 0], np.int32)
    sink = _sink(rng, 16)
    kw = dict(topk_length=jnp.asarray(length), extra_indices=jnp.asarray(eidx), extra_topk_length=jnp.asarray(elength),
              attn_sink=sink, lse_empty=INF, backend="interpret", num_sms=3)
    with interpret_mode(detect_races=True):
        if fp8:
            cache, extra8 = quantize_fp8_latent(kv), quantize_fp8_latent(extra)
            out, lse = mla_decode_sparse_fp8(q, *cache, jnp.asarray(idx), extra_cache=extra8, **kw)
            kv, extra = (dequantize_fp8_latent(*c).astype(jnp.bfloat16) for c in (cache, extra8))
        else:
            out, lse = mla_decode_sparse(q, kv, jnp.asarray(idx), extra_kv_cache=extra, **kw)
        out.block_until_ready()
    ref_out, ref_lse = numpy_sparse_mla(q, kv, idx, topk_length=length, extra_kv=extra, extra_indices=eidx,
                                        extra_topk_length=elength, attn_sink=sink, lse_empty=INF)
    assert np.all(np.asarray(lse)[1, :, 0] == INF)                          # nothing valid from either cache
    assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3, name="lse")
    assert_close(out, ref_out, rtol=2 / 128, atol=2 / 128, name="out")


def _tma_sites(lowered) -> int:
    return lowered.mosaic_modules[0].count("nvvm.cp.async.bulk.tensor.shared.cluster.global")


@pytest.mark.parametrize("page, kv_heads, h, s_q", [(16, 1, 128, 1), (32, 1, 16, 2), (128, 1, 128, 1),
                                                    (64, 2, 32, 1), (64, 8, 128, 2)])
def test_cross_lowers_kv_heads_and_pages_at_v3_shapes(page, kv_heads, h, s_q):
    """B=128, 4096 context tokens, with a sink and lse_empty=+inf: fits (the account is exact), both wgmma shapes,
    one TMA site per page of a step (plus Q's), one batch per sequence and KV head."""
    b, s_k = 128, 4096
    args = (jax.ShapeDtypeStruct((b, s_q, h, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((b * s_k // page, page, kv_heads, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s_k // page + 2), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
            jax.ShapeDtypeStruct((h,), jnp.float32))
    lowered = cross_lower(lambda *a: mla_decode(*a[:4], attn_sink=a[4], lse_empty=INF, backend="mosaic"), *args)
    report, combine = lowered.reports
    assert report.fits_smem and report.smem_bytes == MlaTileConfig().smem_bytes() and report.tma
    assert "m64n64k16.f32.bf16.bf16" in report.wgmma and "m64n256k16.f32.bf16.bf16" in report.wgmma
    assert _tma_sites(lowered) == 1 + max(1, 64 // page)
    tiles = -(-s_q * h // kv_heads // 64)
    assert np.prod(report.grid) == tiles * (132 // tiles)
    assert np.prod(combine.grid) == b * kv_heads * tiles


@pytest.mark.parametrize("page, kv_heads, h", [(16, 1, 128), (128, 2, 64)])
def test_fp8_cross_lowers_kv_heads_and_pages(page, kv_heads, h):
    b, s_k = 128, 4096
    pages = b * s_k // page
    args = (jax.ShapeDtypeStruct((b, 1, h, 576), jnp.bfloat16),
            jax.ShapeDtypeStruct((pages, page, kv_heads, 512), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((pages, page, kv_heads, 4), jnp.float32),
            jax.ShapeDtypeStruct((pages, page, kv_heads, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, s_k // page + 2), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    lowered = cross_lower(functools.partial(mla_decode_fp8, backend="mosaic"), *args)
    report, _ = lowered.reports
    assert report.fits_smem and report.smem_bytes == MlaTileConfig(stages=1).smem_bytes("float8_e4m3fn")
    assert report.tma and "m64n64k16.f32.bf16.bf16" in report.wgmma
    assert _tma_sites(lowered) == 1 + 2 * max(1, 64 // page)                 # latent and rope per page


@pytest.mark.parametrize("fp8", [False, True])
def test_sparse_extra_cache_cross_lowers_at_v32_shapes(fp8):
    """DeepSeek-V3.2 decode (B=64, top-2048 of 32 K tokens, 128 heads) plus 512 ids into an extra cache, per-query
    lengths and a sink: fits, TMA from both caches (two gather sites per cache array)."""
    b, topk, tokens, h = 64, 2048, 64 * 32768, 128
    q = jax.ShapeDtypeStruct((b, 1, h, 576), jnp.bfloat16)
    ids = (jax.ShapeDtypeStruct((b, 1, topk), jnp.int32), jax.ShapeDtypeStruct((b, 1), jnp.int32),
           jax.ShapeDtypeStruct((b, 1, 512), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
           jax.ShapeDtypeStruct((h,), jnp.float32))
    if fp8:
        main, extra = _fp8_bench_args(b, tokens // b, h, 1)[1:4], _fp8_bench_args(1, 4096, h, 1)[1:4]
        fn = lambda *a: mla_decode_sparse_fp8(a[0], *a[1:4], a[5], topk_length=a[6], extra_cache=a[4],  # noqa: E731
                                              extra_indices=a[7], extra_topk_length=a[8], attn_sink=a[9],
                                              backend="mosaic")
        args = (q, *main, extra, *ids)
    else:
        main, extra = (jax.ShapeDtypeStruct((n // 64, 64, 1, 576), jnp.bfloat16) for n in (tokens, 4096))
        fn = lambda *a: mla_decode_sparse(a[0], a[1], a[3], topk_length=a[4], extra_kv_cache=a[2],  # noqa: E731
                                          extra_indices=a[5], extra_topk_length=a[6], attn_sink=a[7], backend="mosaic")
        args = (q, main, extra, *ids)
    lowered = cross_lower(fn, *args)
    report, _ = lowered.reports
    assert report.fits_smem and report.tma and report.threads == (384, 1, 1)
    assert report.smem_bytes == MlaTileConfig(stages=1).smem_bytes("float8_e4m3fn" if fp8 else "bfloat16", sparse=True)
    assert _tma_sites(lowered) == 1 + 2 * (2 if fp8 else 1)                  # Q, then each cache array twice


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["kv_heads_pages", "fp8_pages", "sparse_extra", "sparse_fp8_extra"])
def test_flashmla_surface_on_hopper(rng, case):
    """The same surface on the hardware at FlashMLA's test sizes: against float64 and the XLA path, run twice
    (identical: no races)."""
    sink = _sink(rng, 128)
    if case.startswith("sparse"):
        q, kv, extra, idx, eidx = _sparse_extra_case(rng, b=8, heads=128, topk=2048, topk2=512)
        length = rng.integers(0, 2049, size=(8, 2)).astype(np.int32)
        kw = dict(topk_length=jnp.asarray(length), extra_indices=jnp.asarray(eidx), attn_sink=sink, lse_empty=INF)
        if case == "sparse_fp8_extra":
            cache, extra8 = quantize_fp8_latent(kv), quantize_fp8_latent(extra)
            decode = functools.partial(mla_decode_sparse_fp8, q, *cache, jnp.asarray(idx), extra_cache=extra8, **kw)
            kv, extra = (dequantize_fp8_latent(*c).astype(jnp.bfloat16) for c in (cache, extra8))
        else:
            decode = functools.partial(mla_decode_sparse, q, kv, jnp.asarray(idx), extra_kv_cache=extra, **kw)
        ref_out, ref_lse = numpy_sparse_mla(q, kv, idx, topk_length=length, extra_kv=extra, extra_indices=eidx,
                                            attn_sink=sink, lse_empty=INF)
    else:
        lens = rng.integers(1, 1500, size=16).tolist() + [1, 64, 0]
        page, kv_heads = (32, 2) if case == "kv_heads_pages" else (128, 2)
        q, kv, table, seq = make_case(rng, lens=lens, s_q=2, heads=128, page=page, kv_heads=kv_heads)
        if case == "fp8_pages":
            cache = quantize_fp8_latent(kv)
            decode = functools.partial(mla_decode_fp8, q, *cache, table, seq, attn_sink=sink, lse_empty=INF)
            kv = dequantize_fp8_latent(*cache).astype(jnp.bfloat16)
        else:
            decode = functools.partial(mla_decode, q, kv, table, seq, attn_sink=sink, lse_empty=INF)
        ref_out, ref_lse = numpy_mla(q, kv, table, seq, attn_sink=sink, lse_empty=INF)
    out, lse = decode(backend="mosaic")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(decode(backend="mosaic")[0]))
    assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3, name="lse")
    assert_close(out, ref_out, rtol=2 / 128, atol=2 / 128, name="out")
    assert rel_err(out, decode(backend="xla")[0]) < 1e-2
