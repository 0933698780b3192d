"""MLA decode variants on the XLA path: the FP8 latent cache (DeepSeek-V3.2 layout) and sparse top-k decode."""

import jax.numpy as jnp
import numpy as np
import pytest

from seekax.lowering.reference.mla_decode import dequantize_fp8_latent, quantize_fp8_latent
from seekax.ops.mla import mla_decode, mla_decode_fp8, mla_decode_sparse, mla_decode_sparse_fp8
from seekax.testing import assert_close, calc_diff, rel_err

from seekax.testing.mla_cases import make_case, numpy_mla, numpy_sparse_mla


def test_fp8_quantisation_layout_and_error(rng):
    kv = jnp.asarray(rng.standard_normal((3, 64, 1, 576)) * rng.uniform(0.01, 10, (3, 64, 1, 1)), jnp.bfloat16)
    lat, scales, rope = quantize_fp8_latent(kv)
    assert lat.dtype == jnp.float8_e4m3fn and lat.shape == (3, 64, 1, 512)
    assert scales.dtype == jnp.float32 and scales.shape == (3, 64, 1, 4)
    assert rope.dtype == jnp.bfloat16 and rope.shape == (3, 64, 1, 64)
    deq = np.asarray(dequantize_fp8_latent(lat, scales, rope))
    ref = np.asarray(kv, np.float64)
    np.testing.assert_array_equal(deq[..., 512:], ref[..., 512:])                  # rope stays exact
    tile_amax = np.abs(ref[..., :512]).reshape(3, 64, 1, 4, 128).max(-1, keepdims=True)
    err = np.abs(deq[..., :512] - ref[..., :512]).reshape(3, 64, 1, 4, 128)
    assert np.all(err <= tile_amax * 2 ** -4 + 1e-30)                                 # e4m3: half an ulp of 3 bits


@pytest.mark.parametrize("s_q", [1, 2])
def test_fp8_decode_matches_float64_on_the_dequantised_cache(rng, s_q):
    q, kv, table, seq = make_case(rng, lens=[1, 64, 100], s_q=s_q, heads=16, nan_unused=False)
    lat, scales, rope = quantize_fp8_latent(kv)
    out, lse = mla_decode_fp8(q, lat, scales, rope, table, seq)
    ref_out, ref_lse = numpy_mla(q, dequantize_fp8_latent(lat, scales, rope), table, seq)
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4, name="lse")
    bf16_out, _ = mla_decode(q, kv, table, seq, backend="xla")
    assert calc_diff(out, bf16_out) < 1e-3                                           # FP8 vs bf16 cache: close


def test_sparse_decode_matches_float64(rng):
    b, s_q, h, topk, pages = 2, 2, 8, 24, 5
    _, kv, _, _ = make_case(rng, lens=[1], heads=h, spare_pages=pages - 1, nan_unused=False)
    q = jnp.asarray(rng.standard_normal((b, s_q, h, 576)), jnp.bfloat16)
    idx = rng.integers(0, pages * 64, size=(b, s_q, topk)).astype(np.int32)
    idx[0, 0, :5] = -1                        # skipped
    idx[0, 1, 3] = pages * 64 + 7             # out of range: skipped
    idx[1, 1, :] = -1                         # nothing to attend: out 0, lse -inf
    out, lse = mla_decode_sparse(q, kv, jnp.asarray(idx))
    ref_out, ref_lse = numpy_sparse_mla(q, kv, idx)
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4, name="lse")


def test_sparse_fp8_decode_matches_float64_on_the_dequantised_cache(rng):
    _, kv, _, _ = make_case(rng, lens=[1], heads=8, spare_pages=3, nan_unused=False)
    q = jnp.asarray(rng.standard_normal((2, 2, 8, 576)), jnp.bfloat16)
    idx = rng.integers(-1, kv.shape[0] * 64, size=(2, 2, 40)).astype(np.int32)
    cache = quantize_fp8_latent(kv)
    out, lse = mla_decode_sparse_fp8(q, *cache, jnp.asarray(idx))
    ref_out, ref_lse = numpy_sparse_mla(q, dequantize_fp8_latent(*cache), idx)
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4, name="lse")
    assert calc_diff(out, mla_decode_sparse(q, kv, jnp.asarray(idx))[0]) < 1e-3     # FP8 vs bf16 cache: close


def test_variants_kernel_contract_is_not_implemented(rng):
    """Valid input the kernel does not take: NotImplementedError by name ("mosaic"/"interpret"), the reference
    under "xla" and "auto" (which falls back on a GPU and needs no kernel elsewhere)."""
    q, kv, table, seq = make_case(rng, lens=[3], heads=4, nan_unused=False)
    lat, scales, rope = quantize_fp8_latent(kv)
    lat2, scales2, _ = quantize_fp8_latent(kv, tile=256)                         # 2 scales a token, not 4
    cases = [
        (lambda b: mla_decode_fp8(q, lat2, scales2, rope, table, seq, backend=b), "scales.shape=.*, 2\\)"),
        (lambda b: mla_decode_fp8(q.astype(jnp.float32), lat, scales, rope, table, seq, backend=b),
         "q.dtype=float32"),
        (lambda b: mla_decode_sparse(q[..., :64], kv[..., :64], jnp.zeros((1, 1, 4), jnp.int32), v_dim=32,
                                     backend=b), "qk_dim=64"),
        (lambda b: mla_decode_sparse_fp8(q.astype(jnp.float32), lat, scales, rope, jnp.zeros((1, 1, 4), jnp.int32),
                                         backend=b), "q.dtype=float32"),
    ]
    for call, match in cases:
        for backend in ("mosaic", "interpret"):
            with pytest.raises(NotImplementedError, match=match):
                call(backend)
        out, lse = call("xla")
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        np.testing.assert_array_equal(np.asarray(call("auto")[0], np.float32), np.asarray(out, np.float32))


def test_variants_check_inputs(rng):
    q, kv, table, seq = make_case(rng, lens=[3], heads=4, nan_unused=False)
    lat, scales, rope = quantize_fp8_latent(kv)
    with pytest.raises(ValueError, match="topk >= 1"):
        mla_decode_sparse(q, kv, jnp.zeros((1, 1, 0), jnp.int32))
    with pytest.raises(ValueError, match="scales"):
        mla_decode_sparse_fp8(q, lat, scales[..., :3], rope, jnp.zeros((1, 1, 4), jnp.int32))
    with pytest.raises(ValueError, match="indices.dtype"):
        mla_decode_sparse_fp8(q, lat, scales, rope, jnp.zeros((1, 1, 4), jnp.float32))
    with pytest.raises(ValueError, match="latent_fp8"):
        mla_decode_fp8(q, kv[..., :512], scales, rope, table, seq)
    with pytest.raises(ValueError, match="scales"):
        mla_decode_fp8(q, lat, scales[..., :3], rope, table, seq)
    with pytest.raises(ValueError, match="indices.shape"):
        mla_decode_sparse(q, kv, jnp.zeros((1, 2, 4), jnp.int32))
    with pytest.raises(ValueError, match="indices.dtype"):
        mla_decode_sparse(q, kv, jnp.zeros((1, 1, 4), jnp.float32))
    assert rel_err(mla_decode_sparse(q, kv, jnp.asarray([[[0, 1, 2]]], jnp.int32))[0],
                   numpy_mla(q, kv, jnp.asarray([[0]], jnp.int32), jnp.asarray([3], jnp.int32), causal=False)[0]) < 1e-2
