"""Every FP8 quantiser follows the one documented rule (`seekax.ir.fp8`): scale = max(amax, 1e-4) / 448 per block.

An all-zero block gets the finite scale 1e-4 / 448, quantises to zeros and dequantises to exact zeros (no NaN,
no division by zero); a block whose amax is below the floor gets the same scale. Checked for the FP8 GEMM
quantiser (XLA and the Mosaic kernel in interpret mode), DeepEP's per-token payload, the V3.2 MLA cache
quantiser, and weight blocks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from seekax.ir.fp8 import AMAX_FLOOR, FP8_MAX, SCALE_BLOCK
from seekax.lowering.reference.mla_decode import dequantize_fp8_latent, quantize_fp8_latent
from seekax.ops import ep, fp8
from seekax.testing import interpret_mode

FLOOR_SCALE = np.float32(AMAX_FLOOR) / np.float32(FP8_MAX)        # the float32 the quantisers compute


def _per_token_gemm(x):
    return fp8.quantize_fp8(x)


def _per_token_kernel(x):
    with interpret_mode():
        return fp8.quantize_fp8(x, backend="interpret")


def _per_token_ep(x):
    return ep.quantize_per_token(x)


def _per_token_mla(x):
    """The MLA cache quantiser on a cache of t tokens [t, 1, 1, 512 + 64 rope], back to [t, 512] / [t, 4]."""
    t, h = x.shape
    cache = jnp.concatenate([x, jnp.ones((t, 64), x.dtype)], -1).reshape(t, 1, 1, h + 64)
    lat, scales, rope = quantize_fp8_latent(cache, v_dim=h)
    back = dequantize_fp8_latent(lat, scales, rope)[..., :h].reshape(t, h)
    assert np.all(np.asarray(back)[np.asarray(x) == 0] == 0)
    return lat.reshape(t, h), scales.reshape(t, h // SCALE_BLOCK)


QUANTISERS = {"fp8.quantize_fp8": _per_token_gemm, "fp8.quantize_fp8[interpret]": _per_token_kernel,
              "ep.quantize_per_token": _per_token_ep, "quantize_fp8_latent": _per_token_mla}


def _blocks(rng, t=64, h=512):
    """[t, h] float32: token 0's first block all zero, token 1's second block tiny (amax 1e-6), token 2 all
    zero, the rest random over five orders of magnitude."""
    x = rng.standard_normal((t, h)).astype(np.float32) * np.exp(rng.uniform(-6, 6, (t, 1))).astype(np.float32)
    x[0, :SCALE_BLOCK] = 0.0
    x[1, SCALE_BLOCK:2 * SCALE_BLOCK] = rng.uniform(-1e-6, 1e-6, SCALE_BLOCK)
    x[2] = 0.0
    return x


@pytest.mark.parametrize("name", sorted(QUANTISERS))
def test_all_zero_and_tiny_blocks_get_the_floor_scale(rng, name):
    x = _blocks(rng)
    q, s = QUANTISERS[name](jnp.asarray(x))
    q, s = np.asarray(q).astype(np.float32), np.asarray(s)
    t, h = x.shape
    assert q.shape == (t, h) and s.shape == (t, h // SCALE_BLOCK) and s.dtype == np.float32
    amax = np.abs(x).reshape(t, h // SCALE_BLOCK, SCALE_BLOCK).max(-1)
    zero, tiny = amax == 0, (amax > 0) & (amax < AMAX_FLOOR)
    assert zero[0, 0] and zero[2].all() and tiny[1, 1]
    assert np.all(s[zero | tiny] == FLOOR_SCALE), "an empty or tiny block's scale is max(amax, 1e-4) / 448"
    np.testing.assert_allclose(s[~(zero | tiny)], amax[~(zero | tiny)] / FP8_MAX, rtol=1e-6)
    qb = q.reshape(t, h // SCALE_BLOCK, SCALE_BLOCK)
    assert np.all(qb[zero] == 0) and not np.isnan(q).any(), "an all-zero block quantises to zeros"
    deq = (qb * s[..., None]).reshape(t, h)
    assert np.all(deq[x == 0] == 0), "and dequantises to exact zeros"
    err = np.abs(deq - x).reshape(t, h // SCALE_BLOCK, SCALE_BLOCK)
    assert np.all(err <= np.maximum(amax, AMAX_FLOOR)[..., None] * 2.0 ** -4 + 1e-30)   # half an e4m3 ulp


def test_weight_blocks_and_pow2_scales_follow_the_same_rule(rng):
    w = rng.standard_normal((256, 384)).astype(np.float32)
    w[:128, 128:256] = 0.0                                                     # one all-zero 128 x 128 block
    q, s = fp8.quantize_fp8(jnp.asarray(w), (128, 128))
    assert np.asarray(s)[0, 1] == FLOOR_SCALE and np.all(np.asarray(q)[:128, 128:256].astype(np.float32) == 0)
    q2, s2 = fp8.quantize_fp8(jnp.asarray(w), (128, 128), pow2_scale=True)
    assert np.asarray(s2)[0, 1] == 2.0 ** np.ceil(np.log2(FLOOR_SCALE))     # UE8M0: the floor rounded up
    assert np.all(np.asarray(q2)[:128, 128:256].astype(np.float32) == 0)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize_fp8(q, s, (128, 128)))[:128, 128:256], 0)
