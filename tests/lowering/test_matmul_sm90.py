"""The bf16 NT matmul kernel: interpret-mode numerics, Hopper cross-lowering, and on-GPU checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.ir.tiling import GemmTileConfig, SharedMemoryBudgetExceeded
from seekax.ops.matmul import matmul_nt
from seekax.testing import assert_close, cross_lower, interpret_mode, rel_err

SMALL = [
    # (m, n, k, config): both warpgroup splits, >1 tile per CTA on the persistent loop, K > stages.
    (256, 256, 256, GemmTileConfig(block_m=64, block_n=64, block_k=64, stages=2, epi_block_n=64)),
    (128, 256, 192, GemmTileConfig(block_m=64, block_n=128, block_k=64, stages=3, wg_split="m", epi_block_n=64)),
]


def _inputs(rng, m, n, k, dtype=jnp.bfloat16):
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((n, k)), dtype)
    ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    return a, b, ref


@pytest.mark.parametrize("m, n, k, config", SMALL)
def test_interpret_matches_float64(rng, m, n, k, config):
    a, b, ref = _inputs(rng, m, n, k)
    with interpret_mode(detect_races=True):
        out = matmul_nt(a, b, config=config, backend="interpret", num_sms=3).block_until_ready()
    assert out.dtype == jnp.bfloat16
    # bf16 output of an fp32 accumulation: within 2 bf16 ulps elementwise, ~4e-3 in norm.
    assert_close(out, ref, rtol=2 ** -7, atol=2 ** -7 * np.sqrt(k))
    assert rel_err(out, ref) < 5e-3


def test_xla_backend_is_the_reference(rng):
    a, b, ref = _inputs(rng, 64, 32, 128)
    assert rel_err(matmul_nt(a, b, backend="xla", out_dtype=jnp.float32), ref) < 1e-6


def test_cross_lowers_for_hopper_with_wgmma():
    a = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
    lowered = cross_lower(functools.partial(matmul_nt, backend="mosaic"), a, a)
    (report,) = lowered.reports
    assert report.fits_smem and report.tma
    assert report.wgmma == ("m64n128k16.f32.bf16.bf16",)
    assert report.threads == (384, 1, 1)  # 2 compute warpgroups + 1 memory warpgroup
    assert "mosaic_gpu" in lowered.emit("stablehlo")


def test_overflowing_config_is_a_typed_error_before_lowering():
    a = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
    cfg = GemmTileConfig(block_m=128, block_n=256, block_k=64, stages=6)
    with pytest.raises(SharedMemoryBudgetExceeded):
        cross_lower(functools.partial(matmul_nt, backend="mosaic", config=cfg), a, a)


@pytest.mark.parametrize("a_shape, b_shape, match", [
    ((64, 128), (64, 96), "b.shape"),
    ((64, 128, 1), (64, 128), "a.shape"),
])
def test_bad_shapes_name_the_argument(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        matmul_nt(jnp.zeros(a_shape, jnp.bfloat16), jnp.zeros(b_shape, jnp.bfloat16), backend="xla")


@pytest.mark.parametrize("m, n, k, dtype, match", [
    (100, 256, 256, jnp.bfloat16, "^m=100"),       # no masked M tail in this kernel
    (0, 256, 256, jnp.bfloat16, "^m=0"),           # nothing to launch
    (128, 40, 256, jnp.bfloat16, "^n=40"),         # no tile divides N
])
def test_valid_shapes_the_kernel_does_not_take(m, n, k, dtype, match):
    """The kernel's contract: a one-line NotImplementedError when asked for by name (lowering or interpreting)."""
    a = jax.ShapeDtypeStruct((m, k), dtype)
    b = jax.ShapeDtypeStruct((n, k), dtype)
    with pytest.raises(NotImplementedError, match=match):
        cross_lower(functools.partial(matmul_nt, backend="mosaic", out_dtype=jnp.bfloat16), a, b)
    with pytest.raises(NotImplementedError, match=match):
        jax.eval_shape(functools.partial(matmul_nt, backend="interpret", out_dtype=jnp.bfloat16), a, b)


def test_auto_at_m100_on_a_pretend_hopper_falls_back_to_the_reference(rng, monkeypatch, caplog):
    """On sm_90, "auto" tries the kernel; it declines M=100 and the XLA reference computes the product."""
    from seekax.lowering import backend

    monkeypatch.setattr(backend, "is_hopper", lambda: True)
    a, b, ref = _inputs(rng, 100, 256, 128)
    with caplog.at_level("DEBUG", logger=backend.__name__):
        out = matmul_nt(a, b, backend="auto", out_dtype=jnp.float32)
    assert out.shape == (100, 256) and out.dtype == jnp.float32
    assert rel_err(out, ref) < 1e-6                          # bf16 products are exact in the f32 accumulation
    assert "matmul_nt: the kernel declined (m=100" in caplog.text
    with pytest.raises(NotImplementedError, match="^m=100"):
        matmul_nt(a, b, backend="mosaic")


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1024, 1024, 1024), (4096, 2048, 512)])
def test_on_hopper(rng, m, n, k):
    a, b, ref = _inputs(rng, m, n, k)
    out = matmul_nt(a, b, backend="mosaic")
    out2 = matmul_nt(a, b, backend="mosaic")
    assert rel_err(out, ref) < 5e-3
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))  # deterministic: no races
