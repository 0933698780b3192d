"""Public FP8 ops on the xla backend: quantisation, dense/grouped GEMMs vs float64 numpy, fp8_linear + grad,
and the clear errors every backend shares (validation runs before any backend).

Tolerances: a GEMM of already-quantised operands differs from the float64 oracle only by fp32 accumulation
and the output rounding (bf16: 2/128 relative elementwise, rel_err < 1e-2). Against unquantised inputs we
use DeepGEMM's calc_diff < 1e-3 (e4m3 keeps 3 mantissa bits: |x - deq(q(x))| <= |x|/16 + scale/512).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.lowering.reference.fp8_gemm import np_dequantize, np_gemm_nt, np_grouped_contiguous
from seekax.ops import fp8
from seekax.testing.compare import assert_close, calc_diff

E4M3 = jnp.float8_e4m3fn


def _quant(rng, shape, block, scale=1.0):
    x = jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
    return (x, *fp8.quantize_fp8(x, block))


# ----------------------------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@pytest.mark.parametrize("shape", [(200, 300), (3, 130, 256)])
def test_quantize_matches_numpy(rng, block, shape):
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 100)
    x[..., :1, :128] = 0.0  # an all-zero block: scale clamps to 1e-4 / 448
    q, s = fp8.quantize_fp8(jnp.asarray(x), block)
    m, k = shape[-2:]
    kp, mb, kb = -(-k // 128) * 128, -(-m // block[0]), -(-k // 128)
    assert q.shape == (*shape[:-1], kp) and q.dtype == E4M3
    assert s.shape == (*shape[:-2], mb, kb) and s.dtype == jnp.float32
    xp = np.zeros((*shape[:-2], mb * block[0], kp))
    xp[..., :m, :k] = x
    amax = np.abs(xp.reshape(*shape[:-2], mb, block[0], kb, 128)).max(axis=(-3, -1))
    np.testing.assert_allclose(np.asarray(s), np.maximum(amax, 1e-4) / 448.0, rtol=1e-6)
    assert np.all(np.asarray(q[..., k:]).astype(np.float32) == 0)      # K padding is zero
    deq = np_dequantize(q, s, block)[..., :k]
    bound = np.abs(x) / 16 + np_dequantize(np.ones(q.shape, np.float32), s, block)[..., :k] / 512
    assert np.all(np.abs(deq - x) <= bound * 1.0001)


def test_quantize_pow2_scales(rng):
    x = jnp.asarray(rng.standard_normal((64, 256)) * 3, jnp.float32)
    q, s = fp8.quantize_fp8(x, pow2_scale=True)
    s = np.asarray(s)
    np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))
    amax = np.abs(np.asarray(x)).reshape(64, 2, 128).max(-1)
    assert np.all(s >= amax / 448) and np.all(s < 2 * amax / 448)
    assert calc_diff(fp8.dequantize_fp8(q, s), x) < 1e-3


def test_dequantize_roundtrip_dtype(rng):
    x, q, s = _quant(rng, (4, 128, 256), (128, 128))
    d = fp8.dequantize_fp8(q, s, (128, 128), dtype=jnp.bfloat16)
    assert d.dtype == jnp.bfloat16 and d.shape == x.shape
    assert calc_diff(d, x) < 1e-3


# ----------------------------------------------------------------------------------------------- GEMMs
@pytest.mark.parametrize("m,n,k", [(64, 256, 256), (200, 256, 384), (1, 128, 128), (0, 128, 256), (77, 192, 300)])
def test_fp8_gemm_nt_vs_float64(rng, m, n, k):
    x, a, sa = _quant(rng, (m, k), (1, 128))
    w, b, sb = _quant(rng, (n, k), (128, 128), scale=0.05)
    out = jax.jit(lambda *z: fp8.fp8_gemm_nt(*z, backend="xla"))(a, sa, b, sb)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert_close(out, np_gemm_nt(a, sa, b, sb), max_rel_err=1e-2)
    if m:
        assert calc_diff(out, np.asarray(x) @ np.asarray(w).T) < 1e-3


def test_fp8_gemm_nt_f32_out(rng):
    _, a, sa = _quant(rng, (96, 256), (1, 128))
    _, b, sb = _quant(rng, (128, 256), (128, 128))
    out = fp8.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.float32, backend="xla")
    assert out.dtype == jnp.float32
    assert_close(out, np_gemm_nt(a, sa, b, sb), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sizes", [[50, 0, 100, 6], [0, 0, 256, 0], [0, 0, 0, 0], [10, 20, 30, 40]])
def test_m_grouped_contiguous_vs_float64(rng, sizes):
    m, n, k, g = 256, 128, 256, len(sizes)
    _, a, sa = _quant(rng, (m, k), (1, 128))
    _, b, sb = _quant(rng, (g, n, k), (128, 128))
    gs = jnp.asarray(sizes, jnp.int32)
    out = jax.jit(lambda *z: fp8.m_grouped_fp8_gemm_nt_contiguous(*z, backend="xla"))(a, sa, b, sb, gs)
    ref = np_grouped_contiguous(a, sa, b, sb, sizes)
    assert_close(out, ref, max_rel_err=1e-2)
    assert np.all(np.asarray(out[sum(sizes):]) == 0)


@pytest.mark.parametrize("m,n,k", [(64, 128, 576), (33, 128, 2112), (8, 256, 7168 + 64)])
def test_fp8_gemm_nt_k_tail_vs_float64(rng, m, n, k):
    """K not a multiple of 128 (DeepGEMM's dgrad K = 576, 2112): the e4m3 operands have exactly K columns."""
    x, a, sa = _quant(rng, (m, k), (1, 128))
    w, b, sb = _quant(rng, (n, k), (128, 128), scale=0.05)
    a, b = a[:, :k], b[:, :k]
    out = fp8.fp8_gemm_nt(a, sa, b, sb, backend="xla")
    assert_close(out, np_gemm_nt(a, sa, b, sb), max_rel_err=1e-2)
    assert calc_diff(out, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) < 1e-3


def test_fp8_gemm_nt_accumulate_and_row_scales_vs_float64(rng):
    """DeepGEMM's wgrad case: c + A B with 1x128 scales on both operands, float32 out by default."""
    x, a, sa = _quant(rng, (96, 256), (1, 128))
    w, b, sb = _quant(rng, (128, 256), (1, 128))
    c = jnp.asarray(rng.standard_normal((96, 128)) * 32, jnp.float32)
    out = jax.jit(lambda *z: fp8.fp8_gemm_nt(*z[:4], c=z[4], b_block=(1, 128), backend="xla"))(a, sa, b, sb, c)
    assert out.dtype == jnp.float32
    assert_close(out, np.asarray(c) + np_gemm_nt(a, sa, b, sb, (1, 128)), rtol=1e-5, atol=1e-3)
    assert calc_diff(out, np.asarray(c) + np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) < 1e-3


@pytest.mark.parametrize("ids", [[0, 0, -1, -1, 2, 2, 2, -1], [-1, 1, 1, 1, -1, -1, 0, -1], [-1] * 8])
def test_m_grouped_contiguous_m_indices_vs_float64(rng, ids):
    from seekax.lowering.reference.fp8_gemm import np_grouped_rows

    m, n, k = len(ids), 128, 256
    _, a, sa = _quant(rng, (m, k), (1, 128))
    _, b, sb = _quant(rng, (3, n, k), (128, 128))
    v = np.asarray(ids, np.int32)
    a = jnp.where(jnp.asarray(v < 0)[:, None], jnp.asarray(jnp.nan, a.dtype), a)    # padding rows: NaN
    f = jax.jit(lambda mi: fp8.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices=mi, backend="xla"))
    out = f(jnp.asarray(v))                                                           # traced ids under jit
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, np_grouped_rows(np.where((v < 0)[:, None], 0, np.asarray(a, np.float32)), sa, b, sb, v),
                 max_rel_err=1e-2)


def test_m_grouped_masked_vs_float64(rng):
    g, m_max, n, k = 4, 64, 128, 384
    _, a, sa = _quant(rng, (g, m_max, k), (1, 128))
    _, b, sb = _quant(rng, (g, n, k), (128, 128))
    masked = jnp.asarray([0, 64, 17, 1], jnp.int32)
    out = jax.jit(lambda *z: fp8.m_grouped_fp8_gemm_nt_masked(*z, backend="xla"))(a, sa, b, sb, masked)
    ref = np_gemm_nt(a, sa, b, sb)
    ref[np.arange(m_max)[None, :] >= np.asarray(masked)[:, None]] = 0
    assert_close(out, ref, max_rel_err=1e-2)


def test_k_grouped_wgrad_vs_float64(rng):
    sizes = [128, 0, 256, 128]
    total, m, n = sum(sizes), 64, 96
    dy = rng.standard_normal((total, m)).astype(np.float32)
    x = rng.standard_normal((total, n)).astype(np.float32)
    # token-major operands, one scale per 128 tokens per column: quantise the transposes per (1, 128).
    aq, sa = fp8.quantize_fp8(jnp.asarray(dy.T))
    bq, sb = fp8.quantize_fp8(jnp.asarray(x.T))
    a, b, sa, sb = aq.T, bq.T, sa.T, sb.T
    out = fp8.k_grouped_fp8_gemm_tn_contiguous(a, sa, b, sb, jnp.asarray(sizes, jnp.int32), backend="xla")
    assert out.shape == (4, m, n) and out.dtype == jnp.float32
    a64 = np_dequantize(aq, sa.T, (1, 128)).T
    b64 = np_dequantize(bq, sb.T, (1, 128)).T
    starts = np.cumsum([0] + sizes)
    ref = np.stack([a64[s:e].T @ b64[s:e] for s, e in zip(starts[:-1], starts[1:])])
    assert_close(out, ref, rtol=1e-5, atol=1e-3)
    assert np.all(np.asarray(out[1]) == 0)


def test_grouped_under_jit_with_traced_sizes(rng):
    _, a, sa = _quant(rng, (128, 128), (1, 128))
    _, b, sb = _quant(rng, (2, 128, 128), (128, 128))
    f = jax.jit(lambda gs: fp8.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, gs, backend="xla"))
    for sizes in ([64, 64], [0, 100]):
        assert_close(f(jnp.asarray(sizes, jnp.int32)), np_grouped_contiguous(a, sa, b, sb, sizes), max_rel_err=1e-2)


# ----------------------------------------------------------------------------------------------- fp8_linear
def test_fp8_linear_forward_and_grad(rng):
    x = jnp.asarray(rng.standard_normal((2, 96, 320)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((256, 320)) / 16, jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((2, 96, 256)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * ct)

    ref_fn = lambda x, w: jnp.einsum("btk,nk->btn", x.astype(jnp.float32), w.astype(jnp.float32))  # noqa: E731
    y = jax.jit(lambda x, w: fp8.fp8_linear(x, w, backend="xla"))(x, w)
    assert y.shape == (2, 96, 256) and y.dtype == jnp.bfloat16
    assert calc_diff(y, ref_fn(x, w)) < 1e-3
    dx, dw = jax.jit(jax.grad(loss(lambda x, w: fp8.fp8_linear(x, w, backend="xla")), argnums=(0, 1)))(x, w)
    rdx, rdw = jax.grad(loss(ref_fn), argnums=(0, 1))(x, w)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.shape == w.shape and dw.dtype == w.dtype
    assert calc_diff(dx, rdx) < 2e-3
    assert calc_diff(dw, rdw) < 2e-3


def test_fp8_linear_wgrad_keeps_channel_outliers(rng):
    """The weight gradient quantises x^T per (1, 128) along the tokens (one scale per input channel and 128
    tokens): channels 1e5x larger than the rest (past e4m3's range of 448 / 2^-9) leave the other channels'
    gradients accurate, where one scale per 128 x 128 block flushes their values to zero."""
    t, k, n = 256, 256, 128
    scale = np.where(np.arange(k) % 16 == 0, 1e5, 1.0)
    x = jnp.asarray(rng.standard_normal((t, k)) * scale, jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)) / 16, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((t, n)), jnp.float32)
    dw = jax.grad(lambda w: jnp.sum(fp8.fp8_linear(x, w, backend="xla") * ct))(w)
    exact = np.asarray(ct, np.float64).T @ np.asarray(x, np.float64)                 # [N, K]
    small = np.arange(k) % 16 != 0
    assert calc_diff(dw, exact) < 1e-3
    assert calc_diff(np.asarray(dw)[:, small], exact[:, small]) < 1e-3
    dyq, dys = fp8.quantize_fp8(ct.T)                                                 # the same dy^T
    xq, xs = fp8.quantize_fp8(x.T, (128, 128))                                        # the coarser x^T recipe
    coarse = np.asarray(fp8.fp8_gemm_nt(dyq, dys, xq, xs, out_dtype=jnp.float32, backend="xla"))
    assert calc_diff(coarse[:, small], exact[:, small]) > 0.01                        # ~0.09 seen


def test_fp8_linear_backward_uses_fp8_gemms(rng):
    x = jnp.ones((128, 256), jnp.float32)
    w = jnp.ones((128, 256), jnp.float32)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: fp8.fp8_linear(x, w, backend="xla").sum(), (0, 1)))(x, w))
    assert jaxpr.count("float8_e4m3fn") >= 6  # x, w forward; dy, w^T dgrad; dy^T, x^T wgrad


def test_lowering_example_shapes():
    fn, args = fp8.lowering_example(4096, 7168, 2048)
    assert [a.shape for a in args] == [(4096, 2048), (4096, 16), (7168, 2048), (56, 16)]
    assert callable(fn)


# ----------------------------------------------------------------------------------------------- clear errors
def _ok(rng, m=64, n=128, k=256):
    _, a, sa = _quant(rng, (m, k), (1, 128))
    _, b, sb = _quant(rng, (n, k), (128, 128))
    return a, sa, b, sb


def test_dense_bad_inputs(rng):
    a, sa, b, sb = _ok(rng)
    with pytest.raises(ValueError, match="a.dtype"):
        fp8.fp8_gemm_nt(a.astype(jnp.bfloat16), sa, b, sb, backend="xla")
    with pytest.raises(ValueError, match="b.shape"):   # K-major violation: b given as [K, N]
        fp8.fp8_gemm_nt(a, sa, b.T, sb, backend="xla")
    with pytest.raises(ValueError, match="a_scale"):
        fp8.fp8_gemm_nt(a, sa[:, :1], b, sb, backend="xla")
    with pytest.raises(ValueError, match="b_scale"):
        fp8.fp8_gemm_nt(a, sa, b, sb.T, backend="xla")
    with pytest.raises(ValueError, match="a_scale.dtype"):
        fp8.fp8_gemm_nt(a, sa.astype(jnp.bfloat16), b, sb, backend="xla")
    with pytest.raises(ValueError, match="out_dtype"):
        fp8.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.int8, backend="xla")
    with pytest.raises(ValueError, match="backend"):
        fp8.fp8_gemm_nt(a, sa, b, sb, backend="cuda")


def test_grouped_bad_inputs(rng):
    _, a, sa = _quant(rng, (128, 128), (1, 128))
    _, b, sb = _quant(rng, (2, 128, 128), (128, 128))
    f = fp8.m_grouped_fp8_gemm_nt_contiguous
    with pytest.raises(ValueError, match="group_sizes"):
        f(a, sa, b, sb, jnp.asarray([-1, 10], jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="group_sizes"):
        f(a, sa, b, sb, jnp.asarray([100, 100], jnp.int32), backend="xla")   # exceeds M
    with pytest.raises(ValueError, match="group_sizes"):
        f(a, sa, b, sb, jnp.asarray([1, 2, 3], jnp.int32), backend="xla")  # wrong count
    with pytest.raises(ValueError, match="group_sizes.dtype"):
        f(a, sa, b, sb, jnp.asarray([1, 2], jnp.float32), backend="xla")
    with pytest.raises(ValueError, match="b_scale"):
        f(a, sa, b, sb[:1], jnp.asarray([1, 2], jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="b.shape"):
        f(a, sa, jnp.swapaxes(b, 1, 2)[:, :, :64], sb, jnp.asarray([1, 2], jnp.int32), backend="xla")
    am = a.reshape(2, 64, 128)
    sam = sa.reshape(2, 64, 1)
    with pytest.raises(ValueError, match="masked_m"):
        fp8.m_grouped_fp8_gemm_nt_masked(am, sam, b, sb, jnp.asarray([65, 0], jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="a_scale"):
        fp8.m_grouped_fp8_gemm_nt_masked(am, sam[:, :32], b, sb, jnp.asarray([1, 0], jnp.int32), backend="xla")
    at, st = a, jnp.ones((1, 128), jnp.float32)
    with pytest.raises(ValueError, match="group_sizes_k"):   # sizes do not sum to sum_K
        fp8.k_grouped_fp8_gemm_tn_contiguous(at, st, at, st, jnp.asarray([0, 0], jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="group_sizes_k"):   # not multiples of 128
        fp8.k_grouped_fp8_gemm_tn_contiguous(at, st, at, st, jnp.asarray([64, 64], jnp.int32), backend="xla")


def test_accumulate_and_row_layout_bad_inputs(rng):
    a, sa, b, sb = _ok(rng)
    c = jnp.zeros((64, 128), jnp.float32)
    with pytest.raises(ValueError, match="^c.shape"):
        fp8.fp8_gemm_nt(a, sa, b, sb, c=c[:, :64], backend="xla")
    with pytest.raises(ValueError, match="^c.dtype"):
        fp8.fp8_gemm_nt(a, sa, b, sb, c=c.astype(jnp.bfloat16), backend="xla")
    with pytest.raises(ValueError, match="^out_dtype"):
        fp8.fp8_gemm_nt(a, sa, b, sb, c=c, out_dtype=jnp.bfloat16, backend="xla")
    with pytest.raises(ValueError, match="^b_block"):
        fp8.fp8_gemm_nt(a, sa, b, sb, b_block=(2, 128), backend="xla")
    with pytest.raises(ValueError, match="^b_scale"):                    # (1, 128) wants [N, Kb] scales
        fp8.fp8_gemm_nt(a, sa, b, sb, b_block=(1, 128), backend="xla")
    _, ag, sag = _quant(rng, (8, 128), (1, 128))
    _, bg, sbg = _quant(rng, (2, 128, 128), (128, 128))
    f = fp8.m_grouped_fp8_gemm_nt_contiguous
    with pytest.raises(ValueError, match="^group_sizes"):                # neither given
        f(ag, sag, bg, sbg, backend="xla")
    with pytest.raises(ValueError, match="^group_sizes"):                # both given
        f(ag, sag, bg, sbg, jnp.asarray([4, 4], jnp.int32), m_indices=jnp.zeros((8,), jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="^m_indices.shape"):
        f(ag, sag, bg, sbg, m_indices=jnp.zeros((7,), jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="^m_indices='2 at row 3'"):     # G = 2 groups
        f(ag, sag, bg, sbg, m_indices=jnp.asarray([0, 0, 1, 2, -1, -1, -1, -1], jnp.int32), backend="xla")
    with pytest.raises(ValueError, match="^m_indices='group 0 at rows 0..4 with gaps'"):
        f(ag, sag, bg, sbg, m_indices=jnp.asarray([0, 0, -1, 1, 0, -1, -1, -1], jnp.int32), backend="xla")
    t = jnp.zeros((128, 64), E4M3)
    ts = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="^c.shape"):
        fp8.k_grouped_fp8_gemm_tn_contiguous(t, ts, t, ts, jnp.asarray([128], jnp.int32),
                                             c=jnp.zeros((2, 64, 64), jnp.float32), backend="xla")


def test_specs_and_configs_of_the_new_cases(rng):
    from seekax.ir.fp8_tiling import Fp8SwapAbConfig
    from seekax.ir.gemm import GemmSpec, GroupedGemmSpec

    with pytest.raises(ValueError, match="^out_dtype"):
        GemmSpec(m=8, n=128, k=128, a_dtype=E4M3, b_dtype=E4M3, a_scale=(1, 128), b_scale=(1, 128), accumulate=True)
    with pytest.raises(ValueError, match="^accumulate"):
        GroupedGemmSpec(num_groups=2, m=8, n=128, k=128, layout="masked", out_dtype="float32", accumulate=True)
    plain = GemmSpec(m=8, n=128, k=128, a_dtype=E4M3, b_dtype=E4M3, a_scale=(1, 128), b_scale=(128, 128),
                     out_dtype="float32")
    acc = GemmSpec(m=8, n=128, k=128, a_dtype=E4M3, b_dtype=E4M3, a_scale=(1, 128), b_scale=(128, 128),
                   out_dtype="float32", accumulate=True)
    assert acc.min_bytes() == plain.min_bytes() + 4 * 8 * 128 and acc.key() != plain.key()
    _, a, sa = _quant(rng, (64, 128), (1, 128))
    _, b, sb = _quant(rng, (2, 128, 128), (128, 128))
    with pytest.raises(ValueError, match="^config"):
        fp8.m_grouped_fp8_gemm_nt_masked(a.reshape(2, 32, 128), sa.reshape(2, 32, 1), b, sb,
                                         jnp.asarray([1, 2], jnp.int32), config=Fp8SwapAbConfig(), backend="xla")


def test_quantize_and_linear_bad_inputs(rng):
    with pytest.raises(ValueError, match="block"):
        fp8.quantize_fp8(jnp.ones((4, 128)), (2, 128))
    with pytest.raises(ValueError, match="x.dtype"):
        fp8.quantize_fp8(jnp.ones((4, 128), jnp.int32))
    with pytest.raises(ValueError, match="x.shape"):
        fp8.quantize_fp8(jnp.ones((128,)))
    with pytest.raises(ValueError, match="scale"):
        fp8.dequantize_fp8(jnp.ones((4, 128), E4M3), jnp.ones((4, 2), jnp.float32))
    with pytest.raises(ValueError, match="x.shape"):
        fp8.fp8_linear(jnp.ones((4, 64)), jnp.ones((32, 128)))
    with pytest.raises(ValueError, match="w.shape"):
        fp8.fp8_linear(jnp.ones((4, 64)), jnp.ones((64,)))


# ----------------------------------------------------------------------------------------------- configs
def _dense_spec():
    s = jax.ShapeDtypeStruct
    return fp8.validate_fp8_gemm_nt(s((4096, 2048), E4M3), s((4096, 16), jnp.float32), s((7168, 2048), E4M3),
                                    s((56, 16), jnp.float32), jnp.bfloat16)


def test_config_priority_explicit_cache_heuristic(tmp_path, monkeypatch):
    from seekax.ir import device
    from seekax.ir.config_cache import ConfigCache
    from seekax.ir.fp8_tiling import Fp8TileConfig, choose_fp8_config

    monkeypatch.setenv("SEEKAX_CONFIG_CACHE", str(tmp_path / "tiles.json"))
    monkeypatch.setattr(device, "detect_device", lambda: device.H200)
    spec = _dense_spec()
    assert fp8._config(spec, None, "mosaic") == choose_fp8_config(spec)        # empty cache: heuristic
    tuned = Fp8TileConfig(block_n=64, stages=3, grid_tile_width=8)
    ConfigCache().put(spec.key(), device.H200.name, jax.__version__, tuned.to_dict(), 1e-4)
    assert fp8._config(spec, None, "mosaic") == tuned                          # autotuned winner
    assert fp8._config(spec, None, "interpret") == choose_fp8_config(spec)     # the cache is per real device
    explicit = Fp8TileConfig(stages=2)
    assert fp8._config(spec, explicit, "mosaic") is explicit                   # explicit beats everything


@pytest.mark.gpu
def test_autotune_caches_a_winner(tmp_path):
    from seekax.ir.config_cache import ConfigCache
    from seekax.ir.device import detect_device
    from seekax.ir.fp8_tiling import Fp8TileConfig

    cache = ConfigCache(tmp_path / "tiles.json")
    cands = [Fp8TileConfig(stages=2), Fp8TileConfig(block_n=64, stages=4)]
    best = fp8.autotune_fp8_gemm_nt(512, 512, 512, candidates=cands, cache=cache, iters=3)
    assert best in cands
    spec = fp8.validate_fp8_gemm_nt(*fp8.lowering_example(512, 512, 512)[1], jnp.bfloat16)
    assert cache.get(spec.key(), detect_device().name, jax.__version__) == best.to_dict()


def test_auto_falls_back_to_xla_when_the_kernel_declines(rng, monkeypatch):
    """On Hopper, "auto" runs the kernel and falls back to xla on NotImplementedError; an explicit backend raises."""
    from seekax.lowering import backend

    a, sa, b, sb = _ok(rng, m=64, n=40, k=128)   # N = 40: no FP8 kernel tile divides it
    monkeypatch.setattr(backend, "is_hopper", lambda: True)   # pretend we are on sm_90
    out = fp8.fp8_gemm_nt(a, sa, b, sb, backend="auto")
    assert_close(out, np_gemm_nt(a, sa, b, sb), max_rel_err=1e-2)
    with pytest.raises(NotImplementedError, match="n=40"):
        fp8.fp8_gemm_nt(a, sa, b, sb, backend="mosaic")


def test_fp8_linear_grad_inside_shard_map_with_replicated_weight(rng):
    """x split over a data axis, w replicated: dw is the sum over shards (the custom VJP under shard_map)."""
    from jax.sharding import PartitionSpec as P

    from seekax.ops.fp8 import fp8_linear
    from seekax.testing import rel_err

    mesh = jax.make_mesh((4,), ("dp",))
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((128, 128)) / 10, jnp.float32)

    def loss(w, x):
        return jax.lax.psum(fp8_linear(x, w, backend="xla").sum(), "dp")

    sharded = jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=(P(), P("dp")), out_specs=P())
    x_s = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("dp")))
    w_r = jax.device_put(w, jax.sharding.NamedSharding(mesh, P()))
    dw = jax.jit(sharded)(w_r, x_s)
    exact = np.broadcast_to(np.asarray(x, np.float64).sum(0), (128, 128))  # d/dw sum(x @ w.T) = sum_t x[t]
    # The shards' FP8 weight gradients are summed (not averaged, not one shard's): FP8 accuracy vs exact.
    assert rel_err(dw, exact) < 0.05
    assert rel_err(jax.grad(lambda w: fp8_linear(x, w, backend="xla").sum())(w), exact) < 0.05
