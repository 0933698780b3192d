"""Weights for `linear`/`linear_nt`: native FP8 (`Fp8Weight`, as checkpoints store it) and float weights
trained through FP8 GEMMs (`Fp8Train`), against float64 matmuls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.layers.linear import Fp8Train, Fp8Weight, as_float, in_out_shape, linear, linear_nt
from seekax.testing import calc_diff


@pytest.mark.parametrize("n, k", [(96, 128), (64, 200)])                 # partial edge blocks in N, then in K
def test_fp8_weight_matmul_matches_its_dequantised_weight(rng, n, k):
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    q = Fp8Weight.quantize(w)
    assert q.weight.shape == (n, k) and q.scale_inv.shape == (-(-n // 128), -(-k // 128))
    x = jnp.asarray(rng.standard_normal((5, 3, k)), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64).T
    assert calc_diff(linear_nt(x, q, backend="xla"), want) < 1e-3            # activations quantised per (1, 128)
    assert calc_diff(linear(x, q, backend="xla"), want) < 1e-3               # [out, in] for linear too
    assert in_out_shape(q) == (k, n)
    np.testing.assert_array_equal(as_float(q), np.asarray(q.dequantize()).T)
    with pytest.raises(ValueError, match="scale_inv.shape"):
        Fp8Weight(weight=q.weight, scale_inv=jnp.ones((3, 3), jnp.float32))


def test_fp8_train_weight_has_float_gradients(rng):
    w = jnp.asarray(rng.standard_normal((64, 96)) / 8, jnp.float32)        # [in, out]
    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    f = lambda w, wrap: (linear(x, Fp8Train(w) if wrap else w, backend="xla") ** 2).sum()  # noqa: E731
    g_fp8, g_ref = jax.grad(f)(w, True), jax.grad(f)(w, False)
    assert g_fp8.dtype == jnp.float32 and g_fp8.shape == w.shape
    assert calc_diff(g_fp8, g_ref) < 2e-3
    assert calc_diff(linear(x, Fp8Train(w), backend="xla"), x @ w) < 1e-3
