"""The Mosaic GPU permute (row gather) kernel: CPU interpreter with the race detector, cross-lowering for
Hopper at DeepSeek-V3 sizes, and the same check on a GPU when present."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.lowering import dispatch_permute as perm
from seekax.lowering.mosaic import permute_sm90
from seekax.testing.kernels import cross_lower, interpret_mode


def _case(rng, r=24, k=3, g=4, h=128, dtype=jnp.bfloat16, alignment=8):
    local_idx = np.where(rng.random((r, k)) < 0.3, -1, rng.integers(0, g, (r, k))).astype(np.int32)
    p = perm.make_permutation(jnp.asarray(local_idx), g, alignment)
    x = jnp.asarray(rng.standard_normal((r, h)), dtype)
    return x, p


def test_interpret_matches_xla(rng):
    x, p = _case(rng)
    with interpret_mode(detect_races=True):
        got = perm.permute(x, p, backend="interpret").block_until_ready()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(perm.permute(x, p)))


def test_interpret_grad_is_unpermute(rng):
    x, p = _case(rng, r=8, h=64, alignment=1)
    g = jnp.asarray(rng.standard_normal((p.src_row.shape[0], 64)), jnp.float32)
    with interpret_mode():
        got = jax.grad(lambda x: (perm.permute(x, p, backend="interpret") * g).sum())(x.astype(jnp.float32))
        got = got.block_until_ready()
    want = jax.grad(lambda x: (perm.permute(x, p) * g).sum())(x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_cross_lowers_at_deepseek_sizes():
    m, r, h = 4096 * 8, 4096, 7168           # 4096 received rows, up to 8 pairs each, hidden 7168
    f = permute_sm90.build(m, r, h, jnp.bfloat16, permute_sm90.PermuteConfig())
    report = cross_lower(f, jax.ShapeDtypeStruct((m,), jnp.int32), jax.ShapeDtypeStruct((r, h), jnp.bfloat16)).reports
    assert len(report) == 1 and report[0].tma and report[0].fits_smem


def test_config_and_shape_errors():
    with pytest.raises(ValueError, match="block_h"):
        permute_sm90.PermuteConfig(block_h=512)
    with pytest.raises(NotImplementedError, match="hidden"):
        permute_sm90.build(8, 8, 100, jnp.bfloat16, permute_sm90.PermuteConfig())


@pytest.mark.gpu
def test_mosaic_on_gpu(rng):
    x, p = _case(rng, r=4096, k=8, g=32, h=7168)
    got = jax.jit(lambda x: perm.permute(x, p, backend="mosaic"))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(perm.permute(x, p)))
