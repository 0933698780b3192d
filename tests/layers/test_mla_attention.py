"""The MLA layer: prefill + token-by-token decode through the paged latent cache equals full causal attention
of the unabsorbed MLA formulation (float64 numpy); the cache's allocate / append / free."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.layers.mla import MlaConfig, PagedLatentCache, init_mla_params, mla_attention
from seekax.testing import assert_close, interpret_mode, rel_err


def _np_rope(x, pos, theta):
    """x [..., L, (H,) r], interleaved pairs, in float64."""
    r = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, r, 2) / r)                   # [L, r/2]
    if x.ndim == 3:
        ang = ang[:, None]
    c, s = np.cos(ang), np.sin(ang)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def naive_mla(params, x, c: MlaConfig, rope=None, scale=None):
    """Unabsorbed DeepSeek-V3 MLA over whole sequences x [B, L, hidden], causal, float64. rope(v, pos, theta)
    defaults to interleaved pairs; scale to 1/sqrt(qk_nope + qk_rope)."""
    rope = rope or _np_rope
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    rms = lambda v, w: v / np.sqrt((v * v).mean(-1, keepdims=True) + c.eps) * w  # noqa: E731
    outs = []
    for xb in x:
        L = xb.shape[0]
        pos = np.arange(L, dtype=np.float64)
        q = (rms(xb @ p["wq_a"], p["q_norm"]) @ p["wq_b"]) if c.q_lora else xb @ p["wq"]
        q = q.reshape(L, c.heads, c.qk_nope + c.qk_rope)
        q_nope, q_pe = q[..., :c.qk_nope], rope(q[..., c.qk_nope:], pos, c.rope_theta)
        kv = xb @ p["wkv_a"]
        c_kv = rms(kv[:, :c.kv_lora], p["kv_norm"])
        k_pe = rope(kv[:, c.kv_lora:], pos, c.rope_theta)                      # [L, rope], shared by heads
        kvb = (c_kv @ p["wkv_b"]).reshape(L, c.heads, c.qk_nope + c.v_head)
        k_nope, v = kvb[..., :c.qk_nope], kvb[..., c.qk_nope:]
        s = np.einsum("thn,shn->hts", q_nope, k_nope) + np.einsum("thr,sr->hts", q_pe, k_pe)
        s = s * (scale if scale is not None else 1 / np.sqrt(c.qk_nope + c.qk_rope))
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("hts,shv->thv", w, v).reshape(L, -1)
        outs.append(o @ p["wo"])
    return np.stack(outs)


def _run(params, x, c, cache, prefill_len, chunk=1, backend="xla"):
    """Prefill the first prefill_len tokens, then decode `chunk` tokens at a time (jit-ed step)."""
    ys = []
    if prefill_len:
        y, cache = mla_attention(params, x[:, :prefill_len], cache, config=c, mode="prefill")
        ys.append(y)
    step = jax.jit(lambda p, xt, cc: mla_attention(p, xt, cc, config=c, mode="decode", backend=backend))
    for t in range(prefill_len, x.shape[1], chunk):
        y, cache = step(params, x[:, t:t + chunk], cache)
        ys.append(y)
    return jnp.concatenate(ys, axis=1), cache


@pytest.mark.parametrize("config, page, prefill_len, chunk", [
    (MlaConfig.small(), 4, 5, 1),                                               # pages of 4: boundaries crossed often
    (dataclasses.replace(MlaConfig.small(), q_lora=24), 8, 0, 1),             # q compression, decode from empty
    (MlaConfig.small(), 4, 3, 2),                                               # two tokens per decode step (MTP)
])
def test_prefill_then_decode_equals_naive_causal_mla(rng, config, page, prefill_len, chunk):
    params = init_mla_params(jax.random.key(int(rng.integers(1 << 30))), config)
    x = jnp.asarray(rng.standard_normal((2, 11 if chunk == 1 else 9, config.hidden)), jnp.float32)
    cache = PagedLatentCache.create(batch=2, num_pages=8, max_pages=4, latent_dim=config.latent_dim,
                                    page_size=page, dtype=jnp.float32)
    y, cache = _run(params, x, config, cache, prefill_len, chunk)
    assert_close(y, naive_mla(params, x, config), rtol=1e-4, atol=1e-4, name="y")
    assert cache.seq_lens.tolist() == [x.shape[1]] * 2


def test_deepseek_latent_dims_in_bf16_through_the_kernel(rng):
    """576-channel latent (kv_lora 512 + rope 64) in bf16: one decode step on the Mosaic kernel (interpreted)."""
    c = MlaConfig(hidden=64, heads=4, kv_lora=512, q_lora=0, qk_nope=32, qk_rope=64, v_head=16)
    params = init_mla_params(jax.random.key(1), c, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, c.hidden)), jnp.float32)
    cache = PagedLatentCache.create(batch=2, num_pages=4, max_pages=2, latent_dim=c.latent_dim, dtype=jnp.bfloat16)
    _, cache = mla_attention(params, x[:, :2], cache, config=c, mode="prefill")
    pb = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    with interpret_mode(detect_races=True):
        y, _ = mla_attention(pb, x[:, 2:].astype(jnp.bfloat16), cache, config=c, backend="interpret")
        y.block_until_ready()
    ref = naive_mla(params, x, c)[:, 2:]
    assert rel_err(y, ref) < 3e-2  # bf16 weights, activations and cache


def test_cache_allocates_appends_and_frees():
    cache = PagedLatentCache.create(batch=3, num_pages=6, max_pages=3, latent_dim=2, page_size=4, dtype=jnp.float32)
    lat = jnp.arange(3 * 5 * 2, dtype=jnp.float32).reshape(3, 5, 2)
    cache = cache.append(lat, num_new=jnp.asarray([5, 4, 0]))
    assert cache.seq_lens.tolist() == [5, 4, 0] and int(cache.free.sum()) == 3   # 2 + 1 + 0 pages taken
    t = np.asarray(cache.block_table)
    assert len({t[0, 0], t[0, 1], t[1, 0]}) == 3
    np.testing.assert_array_equal(cache.pages[t[0, 1], 0, 0], lat[0, 4])          # token 4 -> page 1, slot 0
    cache = jax.jit(PagedLatentCache.free_sequences)(cache, jnp.asarray([True, False, False]))
    assert cache.seq_lens.tolist() == [0, 4, 0] and int(cache.free.sum()) == 5
    cache = jax.jit(PagedLatentCache.append)(cache, jnp.ones((3, 5, 2)), jnp.asarray([0, 0, 5]))  # reuses freed pages
    assert cache.seq_lens.tolist() == [0, 4, 5] and int(cache.free.sum()) == 3
    with pytest.raises(ValueError, match="cache.free"):
        cache.append(jnp.ones((3, 12, 2)), num_new=jnp.asarray([12, 4, 0]))      # 3 + 1 pages needed, 3 free
    with pytest.raises(ValueError, match="block_table"):
        cache.append(jnp.ones((3, 9, 2)), num_new=jnp.asarray([0, 9, 0]))        # 13 tokens > 3 pages x 4


def test_bad_layer_input():
    c = MlaConfig.small()
    cache = PagedLatentCache.create(batch=1, num_pages=2, max_pages=2, latent_dim=c.latent_dim, page_size=4)
    params = init_mla_params(jax.random.key(0), c)
    with pytest.raises(ValueError, match="x.shape"):
        mla_attention(params, jnp.zeros((1, 2, 8)), cache, config=c)
    with pytest.raises(ValueError, match="mode"):
        mla_attention(params, jnp.zeros((1, 2, c.hidden)), cache, config=c, mode="train")


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.pop("wkv_b"), r"params\['wkv_b'\].*missing"),
    (lambda p: p.update(wo=jnp.zeros((10, 64))), r"params\['wo'\].shape=\(10, 64\).*\(64, 64\)"),
    (lambda p: p.update(kv_norm=jnp.ones((31,))), r"params\['kv_norm'\].shape=\(31,\).*\(32,\)"),
    (lambda p: p.update(wq_a=p.pop("wq")), r"params\['wq'\].*missing"),  # q_lora=0: wq, not wq_a
])
def test_bad_params_are_named_before_any_compute(edit, match):
    c = MlaConfig.small()
    cache = PagedLatentCache.create(batch=2, num_pages=4, max_pages=2, latent_dim=c.latent_dim, page_size=4)
    params = init_mla_params(jax.random.key(0), c)
    edit(params)
    with pytest.raises(ValueError, match=match):
        mla_attention(params, jnp.zeros((2, 3, c.hidden)), cache, config=c, mode="prefill")
    assert int(cache.seq_lens.sum()) == 0


def test_batch_mismatch_with_the_cache_is_named():
    c = MlaConfig.small()
    cache = PagedLatentCache.create(batch=2, num_pages=4, max_pages=2, latent_dim=c.latent_dim, page_size=4)
    params = init_mla_params(jax.random.key(0), c)
    with pytest.raises(ValueError, match=r"x.shape=\(3, 1, 64\).*batch 2 matching the cache"):
        mla_attention(params, jnp.zeros((3, 1, c.hidden)), cache, config=c)
    with pytest.raises(ValueError, match=r"num_new.shape"):
        mla_attention(params, jnp.zeros((2, 1, c.hidden)), cache, config=c, num_new=jnp.ones((3,), jnp.int32))


def test_yarn_rope_halves_and_mscale_match_numpy(rng):
    """YaRN frequencies, cos/sin attention factor, mscale^2 softmax scale and RoPE on halves (rope_interleave
    off), through prefill + decode, against float64 numpy built from the same formulas."""
    from seekax.layers.mla import YarnScaling

    yarn = YarnScaling(factor=4.0, original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=0.8)
    c = dataclasses.replace(MlaConfig.small(), yarn=yarn, rope_interleave=False)
    params = init_mla_params(jax.random.key(3), c)
    x = jnp.asarray(rng.standard_normal((2, 9, c.hidden)), jnp.float32)
    cache = PagedLatentCache.create(batch=2, num_pages=8, max_pages=4, latent_dim=c.latent_dim, page_size=4,
                                    dtype=jnp.float32)
    y, _ = _run(params, x, c, cache, 4)
    inv = yarn.inv_freq(c.qk_rope, c.rope_theta)
    f = yarn.cos_sin_factor()
    assert f != 1.0 and c.softmax_scale != 1 / np.sqrt(c.qk_nope + c.qk_rope)

    def rope_halves(v, pos, theta):
        ang = pos[:, None] * inv
        if v.ndim == 3:
            ang = ang[:, None]
        cos, sin = np.cos(ang) * f, np.sin(ang) * f
        h = v.shape[-1] // 2
        a, b = v[..., :h], v[..., h:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    ref = naive_mla(params, x, c, rope=rope_halves, scale=c.softmax_scale)
    assert_close(y, ref, rtol=1e-4, atol=1e-4, name="y")


@pytest.mark.parametrize("mode, num_new, match", [
    ("prefill", [5, 3], r"num_new=\[5, 3\]: expected counts in \[0, T=3\]"),   # 2 unwritten slots were attended
    ("prefill", [-1, 3], r"num_new=\[-1, 3\]: expected counts in \[0, T=3\]"),  # seq_lens went to -1
    ("decode", [2, 3], r"num_new=\[2, 3\]: expected 0 or T=3 in decode mode"),
])
def test_num_new_outside_its_range_is_named_before_the_cache_changes(mode, num_new, match):
    c = MlaConfig.small()
    cache = PagedLatentCache.create(batch=2, num_pages=8, max_pages=4, latent_dim=c.latent_dim, page_size=4,
                                    dtype=jnp.float32)
    params = init_mla_params(jax.random.key(0), c)
    x = jnp.zeros((2, 3, c.hidden))
    with pytest.raises(ValueError, match=match):
        mla_attention(params, x, cache, config=c, mode=mode, num_new=jnp.asarray(num_new, jnp.int32))
    with pytest.raises(ValueError, match=r"num_new.dtype='float32': expected an integer dtype"):
        mla_attention(params, x, cache, config=c, mode="prefill", num_new=jnp.asarray([2.5, 3.0]))
    with pytest.raises(ValueError, match=r"num_new=\[4, 0\]"):
        cache.append(jnp.zeros((2, 3, c.latent_dim)), jnp.asarray([4, 0], jnp.int32))
    step = jax.jit(lambda n: mla_attention(params, x, cache, config=c, mode="prefill", num_new=n)[1].seq_lens)
    assert step(jnp.asarray([2, 0], jnp.int32)).tolist() == [2, 0]                  # traced counts: trusted
