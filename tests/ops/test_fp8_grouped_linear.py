"""`grouped_fp8_linear`: MoE experts trained through FP8 grouped GEMMs (forward and dgrad m-grouped contiguous,
wgrad k-grouped over 128-aligned token blocks), against float64 numpy per group; the same VJP on the Mosaic GPU
interpreter, cross-lowered for Hopper at a DeepSeek-V3 shape, and on the GPU.

Tolerance: against the unquantised float64 product, DeepGEMM's calc_diff < 1e-3 (fp8_linear's bound, 2e-3 for
the gradients, whose operands are quantised twice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.ops import fp8
from seekax.testing.compare import calc_diff


def _numpy_grouped(x, w, dy, sizes):
    """y = x_g @ w_g^T, dx = dy_g @ w_g, dw_g = dy_g^T x_g per run of rows, float64; rows past the runs: 0."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((x.shape[0], w.shape[1])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for g, n in enumerate(sizes):
        rows = slice(start, start + n)
        y[rows], dx[rows], dw[g] = x[rows] @ w[g].T, dy[rows] @ w[g], dy[rows].T @ x[rows]
        start += n
    return y, dx, dw


def _value_and_vjp(x, w, dy, sizes, backend):
    f = jax.jit(lambda x, w: fp8.grouped_fp8_linear(x, w, jnp.asarray(sizes, jnp.int32), backend=backend))
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


@pytest.mark.parametrize("sizes,dtype", [([70, 0, 130, 50], jnp.float32), ([128, 256, 1, 5], jnp.bfloat16)],
                         ids=["unaligned_empty_padding_f32", "aligned_and_tiny_bf16"])
def test_value_and_grads_match_float64(rng, sizes, dtype):
    m, k, n = 400, 320, 256                            # K not a multiple of 128; rows past the groups: padding
    used = sum(sizes)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[used:] = np.nan                                  # padding rows are never read
    w = (rng.standard_normal((len(sizes), n, k)) / 16).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    dy[used:] = np.nan                                 # nor is their cotangent
    y, dx, dw = _value_and_vjp(jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(dy, dtype), sizes, "xla")
    assert y.shape == (m, n) and y.dtype == dtype and dx.dtype == dtype and dw.shape == w.shape
    want_y, want_dx, want_dw = _numpy_grouped(np.nan_to_num(np.asarray(jnp.asarray(x, dtype), np.float32)),
                                              np.asarray(jnp.asarray(w, dtype), np.float32),
                                              np.nan_to_num(np.asarray(jnp.asarray(dy, dtype), np.float32)), sizes)
    for got in (y, dx, dw):
        assert np.isfinite(np.asarray(got, np.float32)).all()
    assert (np.asarray(y[used:]) == 0).all() and (np.asarray(dx[used:]) == 0).all()
    assert calc_diff(np.asarray(y[:used], np.float32), want_y[:used]) < 1e-3
    assert calc_diff(np.asarray(dx[:used], np.float32), want_dx[:used]) < 2e-3
    for g, size in enumerate(sizes):
        if size == 0:
            assert (np.asarray(dw[g]) == 0).all()      # an empty expert gets no gradient
        elif size >= 64:
            assert calc_diff(np.asarray(dw[g], np.float32), want_dw[g]) < 2e-3, g
        else:                                          # a handful of tokens: relative to the gradient's size
            err = np.abs(np.asarray(dw[g], np.float32) - want_dw[g]).max()
            assert err <= 0.07 * np.abs(want_dw[g]).max(), (g, err)


def test_block_aligned_rows_puts_each_group_on_a_128_row_boundary():
    sizes = jnp.asarray([3, 0, 128, 129, 1], jnp.int32)
    dest, aligned, total = fp8.block_aligned_rows(sizes, 270)
    assert total == -(-(270 + 5 * 127) // 128) * 128
    aligned = np.asarray(aligned)
    assert (aligned % 128 == 0).all() and aligned.sum() == total
    np.testing.assert_array_equal(aligned[:4], [128, 0, 128, 256])
    dest = np.asarray(dest)
    starts = np.concatenate([[0], np.cumsum(aligned)[:-1]])
    want = np.concatenate([starts[g] + np.arange(s) for g, s in enumerate([3, 0, 128, 129, 1])])
    np.testing.assert_array_equal(dest[:261], want)
    assert (dest[261:] == total).all()                 # rows in no group go nowhere


def test_trains_inside_shard_map_with_sharded_experts(rng):
    """Experts split over "ep" (each rank its own groups and rows): gradients per rank equal the one-device op's."""
    mesh = jax.make_mesh((4,), ("ep",))
    g_local, m, k, n = 2, 96, 128, 128
    sizes = np.array([[40, 30], [0, 96], [10, 0], [50, 46]], np.int32)           # [ranks, local experts]
    x = jnp.asarray(rng.standard_normal((4 * m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4 * g_local, n, k)) / 16, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((4 * m, n)), jnp.float32)
    spec = jax.sharding.PartitionSpec("ep")

    def body(x, w, s, ct):
        return (fp8.grouped_fp8_linear(x, w, s[0], backend="xla") * ct).sum()[None]

    loss = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    grads = jax.jit(jax.grad(lambda x, w: loss(x, w, put(jnp.asarray(sizes)), put(ct)).sum(), (0, 1)))(put(x), put(w))
    dx, dw = (np.asarray(a) for a in grads)
    for r in range(4):
        rows, experts = slice(r * m, (r + 1) * m), slice(r * g_local, (r + 1) * g_local)
        one = jax.grad(lambda x, w: (fp8.grouped_fp8_linear(x, w, jnp.asarray(sizes[r]), backend="xla")
                                     * ct[rows]).sum(), (0, 1))(x[rows], w[experts])
        np.testing.assert_allclose(dx[rows], np.asarray(one[0]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dw[experts], np.asarray(one[1]), rtol=1e-6, atol=1e-6)


def test_backward_runs_fp8_gemms_only():
    x, w, s = jnp.ones((256, 128)), jnp.ones((2, 128, 128)), jnp.asarray([100, 156], jnp.int32)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: fp8.grouped_fp8_linear(x, w, s, backend="xla").sum(),
                                        (0, 1)))(x, w))
    assert jaxpr.count("float8_e4m3fn") >= 6           # x, w forward; dy, w^T dgrad; dy^T, x^T wgrad


def test_bad_inputs_are_named(rng):
    x, w, s = jnp.ones((8, 128)), jnp.ones((2, 64, 128)), jnp.asarray([4, 4], jnp.int32)
    with pytest.raises(ValueError, match="w.shape"):
        fp8.grouped_fp8_linear(x, w[0], s)
    with pytest.raises(ValueError, match="x.shape"):
        fp8.grouped_fp8_linear(jnp.ones((8, 96)), w, s)
    with pytest.raises(ValueError, match="group_sizes"):
        fp8.grouped_fp8_linear(x, w, jnp.asarray([4, 4, 0], jnp.int32))
    with pytest.raises(ValueError, match="group_sizes"):
        fp8.grouped_fp8_linear(x, w, jnp.asarray([6, 6], jnp.int32))              # 12 rows of 8
    with pytest.raises(ValueError, match="x.dtype"):
        fp8.grouped_fp8_linear(x.astype(jnp.int32), w, s)
    with pytest.raises(ValueError, match="backend"):
        fp8.grouped_fp8_linear(x, w, s, backend="cuda")


def test_interpret_kernels_equal_the_xla_path(rng):
    """The same VJP through the Mosaic GPU kernels on the CPU interpreter: m-grouped forward and dgrad,
    k-grouped wgrad over the 128-aligned copy. Same quantised operands, so only fp32 accumulation order differs."""
    from seekax.testing import interpret_mode

    sizes = [70, 100]
    x = jnp.asarray(rng.standard_normal((200, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2, 128, 128)) / 16, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((200, 128)), jnp.bfloat16)
    with interpret_mode():
        got = _value_and_vjp(x, w, dy, sizes, "interpret")
    want = _value_and_vjp(x, w, dy, sizes, "xla")
    for a, b, name in zip(got, want, ("y", "dx", "dw")):
        assert calc_diff(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 1e-6, name
    exact = _numpy_grouped(x, w, dy, sizes)
    assert calc_diff(np.asarray(got[2], np.float32), exact[2]) < 2e-3


def test_vjp_cross_lowers_for_hopper_at_a_deepseek_v3_shape():
    """One rank's experts of DeepSeek-V3's up projection (8 local experts, H = 7168 -> I = 2048, 4096 rows):
    forward, dgrad and wgrad all lower to Mosaic GPU kernels within shared memory."""
    from seekax.testing.kernels import cross_lower

    g, m, k, n = 8, 4096, 7168, 2048
    def f(x, w, s, dy):
        y, vjp = jax.vjp(lambda x, w: fp8.grouped_fp8_linear(x, w, s, backend="mosaic"), x, w)
        return (y, *vjp(dy))

    sds = jax.ShapeDtypeStruct
    lowered = cross_lower(f, sds((m, k), jnp.bfloat16), sds((g, n, k), jnp.float32), sds((g,), jnp.int32),
                          sds((m, n), jnp.bfloat16))
    assert len(lowered.reports) == 3                   # m-grouped forward, m-grouped dgrad, k-grouped wgrad
    assert all(r.fits_smem and r.tma and "e4m3" in r.summary() for r in lowered.reports)


@pytest.mark.gpu
def test_gpu_value_and_grads():
    rng = np.random.default_rng(5)
    sizes = [700, 0, 1300, 37, 1000]
    m, k, n = 3200, 7168, 2048
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((len(sizes), n, k)) / 64, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    got = _value_and_vjp(x, w, dy, sizes, "mosaic")
    want = _value_and_vjp(x, w, dy, sizes, "xla")
    for a, b, name in zip(got, want, ("y", "dx", "dw")):
        assert calc_diff(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 1e-5, name
