"""A DeepSeek-V3-shaped MoE layer's decode step (hidden 7168, 128 heads, latent 512 + 64, 64-token pages,
native FP8 weights, 256 experts sliced for EP = 8): cross-lowered for Hopper on this CPU, every GEMM with
FP8 weights and the attention run as Mosaic GPU kernels; on a Hopper GPU the same step against XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.layers.linear import Fp8Weight
from seekax.models.v3_layer_example import DecodeStepShape, decode_step_fn, layer_param_shapes, v3_config


def _dots_on_fp8(hlo: str) -> int:
    return sum(1 for line in hlo.splitlines() if "dot_general" in line and "f8E4M3FN" in line)


def test_v3_decode_step_cross_lowers_to_the_mla_and_fp8_kernels():
    from seekax.testing.kernels import cross_lower

    cfg = v3_config()
    assert (cfg.hidden, cfg.mla.heads, cfg.mla.latent_dim) == (7168, 128, 576)
    fn, args = decode_step_fn(cfg, DecodeStepShape(batch=16, seq_len=4096, ep=8), transport="ragged")
    assert args[0]["moe"]["w1"].weight.shape == (256, 2048, 7168)               # global; P("ep"): 32 a rank
    lowered = cross_lower(fn, *args)
    reports = lowered.reports
    assert all(r.fits_smem for r in reports)
    fp8 = [r for r in reports if any("e4m3" in w for w in r.wgmma)]
    bf16 = [r for r in reports if any("bf16" in w for w in r.wgmma)]
    # wq_a, wq_b, wkv_a, wo, shared w1/w3/w2 (dense FP8 GEMMs) + routed w1/w3/w2 (grouped FP8 GEMMs)
    assert len(fp8) == 10
    assert len(bf16) == 1 and bf16[0].threads == (384, 1, 1)                    # the MLA decode kernel
    assert len(reports) == 13                                                   # + split-KV combine + permute
    hlo = lowered.emit("stablehlo")
    assert _dots_on_fp8(hlo) == 0                                               # no XLA fallback for FP8 GEMMs
    assert hlo.count("ragged_all_to_all") == 4                                  # EP dispatch and combine


def _random_layer(cfg, local_experts, key):
    """Random FP8 weights (bf16 draws quantised per 128x128 block) in the shapes of `layer_param_shapes`."""
    shapes = layer_param_shapes(cfg, local_experts)
    keys = iter(jax.random.split(key, 64))

    def draw(leaf):
        if isinstance(leaf, Fp8Weight):
            w = jax.random.normal(next(keys), leaf.shape, jnp.bfloat16) / np.sqrt(leaf.shape[-1])
            return Fp8Weight.quantize(w)
        if leaf.dtype == jnp.bfloat16:
            return jnp.ones(leaf.shape, leaf.dtype)
        return jax.random.normal(next(keys), leaf.shape, leaf.dtype) * (0.05 if leaf.ndim > 1 else 0.01)

    return jax.tree.map(draw, shapes, is_leaf=lambda x: isinstance(x, Fp8Weight))


@pytest.mark.gpu
def test_v3_decode_step_on_hopper_matches_xla():
    from seekax.layers.mla import PagedLatentCache
    from seekax.models.deepseek import layer_step
    from seekax.testing import calc_diff

    cfg = v3_config(n_routed_experts=32)                                        # one EP rank's slice, on one GPU
    params = _random_layer(cfg, 32, jax.random.key(0))
    b, seq = 16, 1024
    lat = jax.random.normal(jax.random.key(1), (b * seq // 64, 64, 1, 576), jnp.bfloat16)
    table = jnp.arange(b * seq // 64, dtype=jnp.int32).reshape(b, seq // 64)
    pages = jnp.concatenate([lat, jnp.zeros((b, 64, 1, 576), jnp.bfloat16)])   # room for the new token
    cache = PagedLatentCache(pages=pages, block_table=jnp.concatenate([table, jnp.full((b, 1), 0, jnp.int32)], 1),
                             seq_lens=jnp.full((b,), seq - 1, jnp.int32),
                             free=jnp.zeros((pages.shape[0],), bool).at[-b:].set(True))
    h = jax.random.normal(jax.random.key(2), (b, 1, cfg.hidden), jnp.bfloat16)
    step = jax.jit(lambda p, h, c, backend: layer_step(p, h, c, cfg, cfg.first_k_dense, mode="decode",
                                                       backend=backend)[0], static_argnames="backend")
    got = step(params, h, cache, "mosaic")
    want = step(params, h, cache, "xla")
    assert calc_diff(got.astype(jnp.float32), want.astype(jnp.float32)) < 1e-3
