"""FP8 GEMM kernels, one parameterised base run against every backend: "xla" (the oracle path),
"interpret" (the Mosaic GPU kernels on the CPU interpreter, race detector on, uninitialised memory = NaN so
an unwritten output element shows up), "mosaic" (Hopper only, @pytest.mark.gpu).

Tolerance: operands are already quantised, so the kernels differ from the float64 oracle only by fp32
accumulation order and the output rounding: bf16 elementwise 2/128 relative (+2/128 absolute) and a global
relative error < 1e-2; float32 output 1e-5 relative.
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.ir.fp8_tiling import Fp8SwapAbConfig, Fp8TileConfig, fp8_config_from_dict
from seekax.ir.tiling import SharedMemoryBudgetExceeded, WgSplit
from seekax.lowering.mosaic.fp8_gemm_sm90 import tma_aligned_scales
from seekax.lowering.reference.fp8_gemm import np_dequantize, np_gemm_nt, np_grouped_contiguous, np_grouped_rows
from seekax.ops import fp8
from seekax.testing.compare import assert_close, calc_diff
from seekax.testing.kernels import interpret_mode

BACKENDS = [pytest.param("xla"), pytest.param("interpret"), pytest.param("mosaic", marks=pytest.mark.gpu)]


def run(backend, fn, *args, detect_races=True, **kwargs):
    """Call an op on `backend`; the interpreter (with its race detector) wraps interpret runs."""
    ctx = interpret_mode(detect_races=detect_races) if backend == "interpret" else contextlib.nullcontext()
    with ctx:
        return jax.block_until_ready(fn(*args, backend=backend, **kwargs))


def quant(rng, shape, block, spread=True):
    """Quantised random operand; with `spread`, scales vary by 4x so promotion errors cannot hide."""
    x = rng.standard_normal(shape).astype(np.float32)
    if spread:
        x = x * rng.uniform(0.5, 2.0, size=shape[:-1] + (1,)).astype(np.float32)
    return fp8.quantize_fp8(jnp.asarray(x), block)


def quant_k(rng, shape, block, scale=1.0):
    """(x float32, x_fp8 [..., K] with K exactly as given (quantize_fp8 pads K to 128; the tail is cut off
    again), scales [..., ceil(K/128)]): operands whose K is not a multiple of 128, and their unquantised x."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    q, s = fp8.quantize_fp8(jnp.asarray(x), block)
    return x, q[..., :shape[-1]], s


# ----------------------------------------------------------------------------------------------- dense
DENSE_CASES = [
    ((64, 256, 256), None),                                                               # small M: narrow N tiles
    ((1, 128, 256), None),                                                                # M below one tile: padded
    ((200, 256, 384), None),                                                              # M tail, 3 K blocks
    ((201, 192, 256), None),                                                              # N = 1.5 x 128, odd M
    ((130, 256, 512), Fp8TileConfig(block_m=64, block_n=128, stages=2)),                 # 4 K steps > 2 stages
    ((64, 256, 256), Fp8TileConfig(block_m=64, block_n=64, num_compute_wgs=1, stages=2)),
    ((128, 256, 256), Fp8TileConfig(block_m=128, block_n=64, wg_split=WgSplit.N, stages=2)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,config", DENSE_CASES)
def test_fp8_gemm_nt(rng, backend, shape, config):
    m, n, k = shape
    a, sa = quant(rng, (m, k), (1, 128))
    b, sb = quant(rng, (n, k), (128, 128))
    kw = {} if backend == "xla" or config is None else {"config": config}
    # A pipeline that refills its slots (more K steps than stages) trips a known false positive of the
    # interpreter's race detector on JAX's own warp-specialized pattern (pinned by
    # tests/testing/test_interpret_limits.py); those cases run with the detector off.
    refills = config is not None and k // 128 > config.stages
    out = run(backend, fp8.fp8_gemm_nt, a, sa, b, sb, detect_races=not refills, **kw)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert_close(out, np_gemm_nt(a, sa, b, sb), max_rel_err=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_gemm_nt_float32_out(rng, backend):
    a, sa = quant(rng, (128, 256), (1, 128))
    b, sb = quant(rng, (128, 256), (128, 128))
    out = run(backend, fp8.fp8_gemm_nt, a, sa, b, sb, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    assert_close(out, np_gemm_nt(a, sa, b, sb), rtol=1e-5, atol=1e-4)


def test_kernel_declines_unsupported_n(rng):
    a, sa = quant(rng, (64, 128), (1, 128))
    b, sb = quant(rng, (40, 128), (128, 128))
    with pytest.raises(NotImplementedError, match="n=40"):
        run("interpret", fp8.fp8_gemm_nt, a, sa, b, sb)
    out = fp8.fp8_gemm_nt(a, sa, b, sb, backend="auto")  # auto: xla here; falls back to xla on Hopper
    assert_close(out, np_gemm_nt(a, sa, b, sb), max_rel_err=1e-2)


# K not a multiple of 128: the last block is partial (swizzle 64 for K % 128 == 64, 32 for K % 64 == 32),
# K below one block (padded to 128), and M not a multiple of 8 (the wrapper pads to 8-row tiles).
K_TAIL_CASES = [(64, 128, 320), (100, 192, 576 - 384), (70, 128, 160), (64, 128, 96)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k", K_TAIL_CASES)
def test_fp8_gemm_nt_k_tail(rng, backend, m, n, k):
    x, a, sa = quant_k(rng, (m, k), (1, 128))
    w, b, sb = quant_k(rng, (n, k), (128, 128), scale=0.05)
    assert a.shape == (m, k) and sa.shape == (m, -(-k // 128))
    out = run(backend, fp8.fp8_gemm_nt, a, sa, b, sb)
    assert out.shape == (m, n)
    assert_close(out, np_gemm_nt(a, sa, b, sb), max_rel_err=1e-2)       # the quantised math, exactly summed
    assert calc_diff(out, x.astype(np.float64) @ w.astype(np.float64).T) < 1e-3   # DeepGEMM's oracle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b_block", [(128, 128), (1, 128)])
def test_fp8_gemm_nt_accumulates_into_c(rng, backend, b_block):
    """out = c + A B in float32 (DeepGEMM's wgrad test: c = randn * 32), with either B scale recipe."""
    m, n, k = 100, 128, 256
    x, a, sa = quant_k(rng, (m, k), (1, 128))
    w, b, sb = quant_k(rng, (n, k), b_block)
    c = (rng.standard_normal((m, n)) * 32).astype(np.float32)
    out = run(backend, fp8.fp8_gemm_nt, a, sa, b, sb, c=jnp.asarray(c), b_block=b_block)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert_close(out, c + np_gemm_nt(a, sa, b, sb, b_block), rtol=1e-5, atol=1e-3)
    assert calc_diff(out, c + x.astype(np.float64) @ w.astype(np.float64).T) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_wgrad_per_token_scales_on_both(rng, backend):
    """dW = dY^T X with 1x128 scales along the tokens on both operands (b_block=(1, 128)): each of B's rows has
    its own scale, so B rows 1e5x larger than their neighbours (past e4m3's range) leave the others intact."""
    n_out, k_in, tokens = 128, 192, 256
    dy = rng.standard_normal((tokens, n_out)).astype(np.float32)
    x = rng.standard_normal((tokens, k_in)).astype(np.float32) * np.where(np.arange(k_in) % 7 == 0, 1e5, 1.0)
    a, sa = fp8.quantize_fp8(jnp.asarray(dy.T))                 # [N, T], [N, T/128]
    b, sb = fp8.quantize_fp8(jnp.asarray(x.T))                  # [K, T], [K, T/128] per row of B
    out = run(backend, fp8.fp8_gemm_nt, a, sa, b, sb, b_block=(1, 128), out_dtype=jnp.float32)
    assert out.shape == (n_out, k_in)
    ref = np_gemm_nt(a, sa, b, sb, (1, 128))
    # f32 sums of terms up to ~1e5 that partly cancel: elementwise to the large terms' rounding, globally tight
    assert_close(out, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max(), max_rel_err=1e-5)
    exact = dy.T.astype(np.float64) @ x.astype(np.float64)
    assert calc_diff(out, exact) < 1e-3
    small = np.arange(k_in) % 7 != 0                            # the columns next to the large ones
    assert calc_diff(np.asarray(out)[:, small], exact[:, small]) < 1e-3


# The small-M ("swap AB") kernel: B's rows on wgmma's 64-row side, tokens on its N side. (M, N, K, config):
# one token, a token tile of 24 with two warpgroups, a K tail, 128 B rows per warpgroup, two token tiles.
SWAP_CASES = [(1, 128, 256, Fp8SwapAbConfig(block_tokens=8, stages=2)),
              (20, 256, 256, Fp8SwapAbConfig(block_tokens=24, num_compute_wgs=2, stages=2)),
              (33, 128, 320, Fp8SwapAbConfig(block_tokens=40, stages=3)),
              (64, 256, 256, Fp8SwapAbConfig(block_rows=128, block_tokens=64, stages=2)),
              (70, 128, 256, Fp8SwapAbConfig(block_tokens=40, stages=2))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k,config", SWAP_CASES)
def test_small_m_kernel(rng, backend, m, n, k, config):
    x, a, sa = quant_k(rng, (m, k), (1, 128))
    w, b, sb = quant_k(rng, (n, k), (128, 128), scale=0.05)
    kw = {} if backend == "xla" else {"config": config}
    out = run(backend, fp8.fp8_gemm_nt, a, sa, b, sb, **kw)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    assert_close(out, np_gemm_nt(a, sa, b, sb), max_rel_err=1e-2)
    assert calc_diff(out, x.astype(np.float64) @ w.astype(np.float64).T) < 1e-3


def test_small_m_kernel_declines_what_it_does_not_cover(rng):
    _, a, sa = quant_k(rng, (8, 256), (1, 128))
    _, b, sb = quant_k(rng, (128, 256), (1, 128))
    cfg = Fp8SwapAbConfig(block_tokens=8, stages=2)
    with pytest.raises(NotImplementedError, match="128 x 128 B scales and no c"):
        run("interpret", fp8.fp8_gemm_nt, a, sa, b, sb, b_block=(1, 128), config=cfg)
    with pytest.raises(NotImplementedError, match="n=128"):
        run("interpret", fp8.fp8_gemm_nt, a, sa, b, sb[::128],
            config=Fp8SwapAbConfig(block_rows=128, block_tokens=8, num_compute_wgs=2))


# ----------------------------------------------------------------------------------------------- grouped
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,sizes", [
    (256, [50, 0, 100, 6]),   # a zero-size group, boundaries inside row blocks, 100 rows owned by no group
    (256, [0, 0, 256, 0]),    # all tokens in one group
    (256, [128, 128]),        # block-aligned groups
    (200, [1, 144, 55]),      # a one-row group; sum == M; the last row tile reaches past M (TMA tail)
])
def test_m_grouped_contiguous(rng, backend, m, sizes):
    n, k, g = 256, 256, len(sizes)
    a, sa = quant(rng, (m, k), (1, 128))
    b, sb = quant(rng, (g, n, k), (128, 128))
    out = run(backend, fp8.m_grouped_fp8_gemm_nt_contiguous, a, sa, b, sb, jnp.asarray(sizes, jnp.int32))
    assert out.shape == (m, n)
    assert_close(out, np_grouped_contiguous(a, sa, b, sb, sizes), max_rel_err=1e-2)


def _m_indices(m, runs):
    """[M] int32 group ids from (group, first row, rows) runs; every other row is padding (-1)."""
    ids = np.full(m, -1, np.int32)
    for g, start, size in runs:
        ids[start:start + size] = g
    return ids


# (M, K, runs): 128-aligned groups with padding at each group's end (DeepEP's per-expert alignment), groups
# out of order with padding before, between and after them and an empty group, and a K tail.
ROW_CASES = [(384, 256, [(0, 0, 100), (1, 128, 128), (2, 256, 77)]),
             (200, 320, [(2, 3, 60), (0, 64, 1), (3, 70, 90)])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k,runs", ROW_CASES)
def test_m_grouped_contiguous_m_indices(rng, backend, m, k, runs):
    """Per-row group ids with -1 padding rows: padding rows of a and a_scale are NaN-poisoned and must not
    reach the output (their output rows are 0, every other row finite and right)."""
    n, g = 128, 4
    x, a, sa = quant_k(rng, (m, k), (1, 128))
    w, b, sb = quant_k(rng, (g, n, k), (128, 128), scale=0.05)
    ids = _m_indices(m, runs)
    pad = ids < 0
    a_bad = np.asarray(a).copy()
    a_bad[pad] = np.nan
    sa_bad = np.asarray(sa).copy()
    sa_bad[pad] = np.nan
    out = run(backend, fp8.m_grouped_fp8_gemm_nt_contiguous, jnp.asarray(a_bad), jnp.asarray(sa_bad), b, sb,
              m_indices=jnp.asarray(ids))
    o = np.asarray(out, np.float32)
    assert np.isfinite(o).all() and (o[pad] == 0).all()
    assert_close(out, np_grouped_rows(a, sa, b, sb, ids), max_rel_err=1e-2)
    exact = np.zeros((m, n))
    for r in np.flatnonzero(~pad):
        exact[r] = x[r].astype(np.float64) @ np.asarray(w[ids[r]], np.float64).T
    assert calc_diff(o[~pad], exact[~pad]) < 1e-3


def test_contiguous_kernel_never_writes_padding_rows(rng):
    """The kernel itself leaves padding rows unwritten (the interpreter's fresh memory is NaN); the op's
    zeros come from the wrapper's select."""
    from seekax.ir.gemm import GroupedGemmSpec
    from seekax.lowering.mosaic import fp8_grouped_gemm_sm90 as grouped

    m, n, k = 256, 128, 128
    _, a, sa = quant_k(rng, (m, k), (1, 128))
    _, b, sb = quant_k(rng, (2, n, k), (128, 128))
    ids = _m_indices(m, [(0, 0, 50), (1, 128, 100)])
    spec = GroupedGemmSpec(num_groups=2, m=m, n=n, k=k, layout="contiguous")
    cfg = Fp8TileConfig(block_n=128, stages=2)
    kernel = grouped.contiguous_kernel(spec, cfg, 132)
    bounds = grouped.group_bounds(m_indices=jnp.asarray(ids), num_groups=2, m=m)
    np.testing.assert_array_equal(np.asarray(bounds), [[0, 128], [50, 228]])
    with interpret_mode():
        raw = jax.block_until_ready(kernel(bounds, a, tma_aligned_scales(sa), b, sb))
    raw = np.asarray(raw, np.float32)
    assert np.isnan(raw[ids < 0]).all() and np.isfinite(raw[ids >= 0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_m_grouped_contiguous_k_tail(rng, backend):
    m, n, k, sizes = 136, 128, 192, [70, 0, 60]
    x, a, sa = quant_k(rng, (m, k), (1, 128))
    w, b, sb = quant_k(rng, (3, n, k), (128, 128), scale=0.05)
    out = run(backend, fp8.m_grouped_fp8_gemm_nt_contiguous, a, sa, b, sb, jnp.asarray(sizes, jnp.int32))
    assert_close(out, np_grouped_contiguous(a, sa, b, sb, sizes), max_rel_err=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_m_grouped_masked_k_tail(rng, backend):
    g, m_max, n, k = 2, 60, 128, 320
    _, a, sa = quant_k(rng, (g, m_max, k), (1, 128))
    _, b, sb = quant_k(rng, (g, n, k), (128, 128))
    masked = np.asarray([60, 13], np.int32)
    out = run(backend, fp8.m_grouped_fp8_gemm_nt_masked, a, sa, b, sb, jnp.asarray(masked))
    ref = np_gemm_nt(a, sa, b, sb)
    ref[np.arange(m_max)[None, :] >= masked[:, None]] = 0
    assert_close(out, ref, max_rel_err=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m_max", [128, 100])
def test_m_grouped_masked(rng, backend, m_max):
    g, n, k = 4, 256, 256
    a, sa = quant(rng, (g, m_max, k), (1, 128))
    b, sb = quant(rng, (g, n, k), (128, 128))
    masked = np.asarray([0, m_max, 17, 65], np.int32)
    out = run(backend, fp8.m_grouped_fp8_gemm_nt_masked, a, sa, b, sb, jnp.asarray(masked))
    ref = np_gemm_nt(a, sa, b, sb)
    ref[np.arange(m_max)[None, :] >= masked[:, None]] = 0
    assert_close(out, ref, max_rel_err=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,sizes", [(100, 128, [128, 0, 256, 128]),   # a zero-size group, an M tail
                                       (64, 64, [0, 256])])              # all tokens in one group
def test_k_grouped_wgrad(rng, backend, m, n, sizes):
    total = sum(sizes)
    dy = rng.standard_normal((total, m)).astype(np.float32)
    x = rng.standard_normal((total, n)).astype(np.float32)
    aq, sa = fp8.quantize_fp8(jnp.asarray(dy.T))          # one scale per 128 tokens per column
    bq, sb = fp8.quantize_fp8(jnp.asarray(x.T))
    out = run(backend, fp8.k_grouped_fp8_gemm_tn_contiguous, aq.T, sa.T, bq.T, sb.T, jnp.asarray(sizes, jnp.int32))
    a64, b64 = np_dequantize(aq, sa, (1, 128)).T, np_dequantize(bq, sb, (1, 128)).T   # [T, M], [T, N]
    ends = np.cumsum([0] + sizes)
    ref = np.stack([a64[s:e].T @ b64[s:e] for s, e in zip(ends[:-1], ends[1:])])
    assert out.shape == (len(sizes), m, n) and out.dtype == jnp.float32
    assert_close(out, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [[128, 0, 256], [0, 384, 0]])
def test_k_grouped_wgrad_accumulates_into_c(rng, backend, sizes):
    """DeepGEMM's k-grouped wgrad test: out[g] = c[g] + A_g^T B_g with c = randn * 32, empty groups included
    (their output is c[g] itself)."""
    total, m, n = sum(sizes), 100, 64
    dy = rng.standard_normal((total, m)).astype(np.float32)
    x = rng.standard_normal((total, n)).astype(np.float32)
    aq, sa = fp8.quantize_fp8(jnp.asarray(dy.T))
    bq, sb = fp8.quantize_fp8(jnp.asarray(x.T))
    c = (rng.standard_normal((len(sizes), m, n)) * 32).astype(np.float32)
    out = run(backend, fp8.k_grouped_fp8_gemm_tn_contiguous, aq.T, sa.T, bq.T, sb.T,
              jnp.asarray(sizes, jnp.int32), c=jnp.asarray(c))
    a64, b64 = np_dequantize(aq, sa, (1, 128)).T, np_dequantize(bq, sb, (1, 128)).T
    ends = np.cumsum([0] + sizes)
    prod = np.stack([a64[s:e].T @ b64[s:e] for s, e in zip(ends[:-1], ends[1:])])
    assert out.dtype == jnp.float32
    assert_close(out, c + prod, rtol=1e-5, atol=1e-3)
    exact = np.stack([dy[s:e].T.astype(np.float64) @ x[s:e] for s, e in zip(ends[:-1], ends[1:])])
    assert calc_diff(out, c + exact) < 1e-3
    for g, size in enumerate(sizes):
        if size == 0:
            np.testing.assert_array_equal(np.asarray(out[g]), c[g])


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", [pytest.param("interpret"), pytest.param("mosaic", marks=pytest.mark.gpu)])
def test_fp8_linear_grad_matches_xla_backend(rng, backend):
    x = jnp.asarray(rng.standard_normal((128, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((256, 256)) / 16, jnp.bfloat16)

    def loss(backend):
        return lambda x, w: jnp.sum(fp8.fp8_linear(x, w, backend=backend).astype(jnp.float32) ** 2)

    ctx = interpret_mode() if backend == "interpret" else contextlib.nullcontext()
    with ctx:
        got = jax.block_until_ready(jax.grad(loss(backend), argnums=(0, 1))(x, w))
    want = jax.grad(loss("xla"), argnums=(0, 1))(x, w)
    ref32 = jax.grad(lambda x, w: jnp.sum((x.astype(jnp.float32) @ w.astype(jnp.float32).T) ** 2), argnums=(0, 1))(x, w)
    for g_, w_, r_ in zip(got, want, ref32):
        assert_close(g_, w_, max_rel_err=1e-2)
        assert calc_diff(g_, r_) < 2e-3


# ----------------------------------------------------------------------------------------------- configs
def test_config_smem_budget_is_typed(rng):
    cfg = Fp8TileConfig(block_m=64, block_n=128, wg_split=WgSplit.N, stages=6)
    with pytest.raises(SharedMemoryBudgetExceeded):
        cfg.check_smem()
    a, sa = quant(rng, (64, 1024), (1, 128))
    b, sb = quant(rng, (256, 1024), (128, 128))
    with pytest.raises(SharedMemoryBudgetExceeded):
        fp8.fp8_gemm_nt(a, sa, b, sb, backend="interpret", config=cfg)


@pytest.mark.parametrize("kwargs,name", [({"block_m": 96}, "block_m"), ({"block_n": 48}, "block_n"),
                                         ({"stages": 1}, "stages"), ({"num_compute_wgs": 3}, "num_compute_wgs"),
                                         ({"epi_block_n": 48}, "epi_block_n")])
def test_config_rejects_bad_fields(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Fp8TileConfig(**kwargs)


def test_config_roundtrips_json():
    cfg = Fp8TileConfig(block_n=64, wg_split=WgSplit.N, stages=3, grid_tile_width=4)
    assert Fp8TileConfig.from_dict(cfg.to_dict()) == cfg
    assert fp8_config_from_dict(cfg.to_dict()) == cfg
    swap = Fp8SwapAbConfig(block_tokens=24, num_compute_wgs=2, stages=7)
    assert fp8_config_from_dict(json.loads(json.dumps(swap.to_dict()))) == swap


@pytest.mark.parametrize("kwargs,name", [({"block_rows": 96}, "block_rows"), ({"block_tokens": 12}, "block_tokens"),
                                         ({"block_rows": 128, "block_tokens": 128}, "block_tokens"),
                                         ({"stages": 1}, "stages"), ({"num_compute_wgs": 3}, "num_compute_wgs")])
def test_small_m_config_rejects_bad_fields(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        Fp8SwapAbConfig(**kwargs)


def test_scales_are_tma_aligned():
    """TMA needs 16-byte global strides: the M-major a_scale rows are padded to a multiple of 4 floats."""
    s = jnp.arange(201 * 3, dtype=jnp.float32).reshape(201, 3)
    t = tma_aligned_scales(s)
    assert t.shape == (3, 204)
    np.testing.assert_array_equal(np.asarray(t[:, :201]), np.asarray(s).T)
    assert tma_aligned_scales(jnp.ones((2, 100, 5))).shape == (2, 5, 100)


# ----------------------------------------------------------------------------------------------- quantisation
@pytest.mark.parametrize("backend", [pytest.param("interpret"), pytest.param("mosaic", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("shape,dtype", [((200, 384), jnp.bfloat16), ((2, 64, 256), jnp.float32),
                                         ((1, 128), jnp.float16)])
def test_quantize_kernel_is_bit_equal_to_oracle(rng, backend, shape, dtype):
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 10, size=shape[:-1] + (1,))
    x[..., :1, :128] = 0.0                                    # an all-zero group: the 1e-4 clamp
    x = jnp.asarray(x, dtype)
    q, s = run(backend, fp8.quantize_fp8, x)
    rq, rs = fp8.quantize_fp8(x, backend="xla")
    assert q.shape == rq.shape and q.dtype == rq.dtype and s.shape == rs.shape
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(rq).view(np.uint8))


def test_quantize_kernel_declines_what_it_does_not_cover():
    with pytest.raises(NotImplementedError):
        run("interpret", fp8.quantize_fp8, jnp.ones((64, 200), jnp.bfloat16))           # K not a multiple of 128
    with pytest.raises(NotImplementedError):
        run("interpret", fp8.quantize_fp8, jnp.ones((128, 128), jnp.bfloat16), (128, 128))
