"""DeepSeek-V2/V3 against Hugging Face transformers' outputs on the same checkpoints (tests/data/models/,
written by scripts/make_model_goldens.py): float32 logits, chosen experts, FP8 checkpoints within FP8
tolerance; paged decode token by token and batched prefill of different lengths equal the full forward."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.layers.linear import Fp8Weight
from seekax.models.checkpoint import load_checkpoint
from seekax.models.deepseek import forward, init_caches, serve_step
from seekax.testing import calc_diff, rel_err

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "models")
FLOAT_CASES = ["v3_qlora_grouped", "v3_yarn_tied", "v2_lite", "v2_group_limited"]


@functools.lru_cache(maxsize=None)
def _load(name):
    cfg, params = load_checkpoint(os.path.join(DATA, name), dtype=np.float32, progress=False)
    return cfg, params, dict(np.load(os.path.join(DATA, name, "golden.npz")))


@functools.lru_cache(maxsize=None)
def _forward(name):
    cfg, params, g = _load(name)
    logits, experts = jax.jit(lambda p, t: forward(p, t, cfg, backend="xla"))(params, jnp.asarray(g["tokens"]))
    return np.asarray(logits), {k: np.asarray(v) for k, v in experts.items()}


@pytest.mark.parametrize("name", FLOAT_CASES)
def test_float32_logits_and_experts_match_transformers(name):
    _, _, g = _load(name)
    logits, experts = _forward(name)
    assert rel_err(logits, g["logits"]) <= 1e-5
    want = sorted(k for k in g if k.startswith("experts_"))
    assert [f"experts_{k}" for k in sorted(experts)] == want
    for k, idx in experts.items():
        np.testing.assert_array_equal(np.sort(idx, axis=-1), g[f"experts_{k}"], err_msg=f"layer {k}")


def test_fp8_checkpoint_loads_without_dequantising_and_matches_within_fp8_tolerance():
    cfg, params, g = _load("v3_fp8")
    attn = params["layers"][0]["attn"]
    assert isinstance(attn["wkv_a"], Fp8Weight)                                 # kept as stored: e4m3 + scales
    assert attn["wkv_a"].weight.dtype == jnp.float8_e4m3fn
    assert attn["wkv_a"].shape == (96, 128) and attn["wkv_a"].scale_inv.shape == (1, 1)  # 96 rows: partial block
    assert isinstance(params["layers"][1]["moe"]["w1"], Fp8Weight)
    assert params["layers"][1]["moe"]["w1"].weight.shape == (4, 128, 128)
    assert params["embed"].dtype == np.float32 and params["layers"][1]["moe"]["gate"].dtype == np.float32
    logits, experts = _forward("v3_fp8")
    assert calc_diff(logits, g["logits"]) < 1e-3
    assert rel_err(logits, g["logits"]) < 0.1                                     # FP8 activations: ~6% here
    np.testing.assert_array_equal(np.sort(experts[1], -1), g["experts_1"])


@pytest.mark.parametrize("name, prefill", [("v3_qlora_grouped", 4), ("v2_lite", 0), ("v3_yarn_tied", 7)])
def test_paged_decode_step_by_step_equals_full_forward(name, prefill):
    cfg, params, g = _load(name)
    tokens = jnp.asarray(g["tokens"])
    full, _ = _forward(name)
    caches = init_caches(cfg, batch=2, num_pages=12, max_pages=4, page_size=4, dtype=jnp.float32)
    step = jax.jit(lambda p, t, c, mode: serve_step(p, t, c, cfg, mode=mode, backend="xla")[:2],
                   static_argnames="mode")
    outs = []
    if prefill:
        out, caches = step(params, tokens[:, :prefill], caches, "prefill")
        outs.append(out)
    for t in range(prefill, tokens.shape[1]):
        out, caches = step(params, tokens[:, t:t + 1], caches, "decode")
        outs.append(out)
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    assert rel_err(got, full) <= 1e-5
    assert rel_err(got, g["logits"]) <= 1e-5


def test_batched_prefill_of_different_lengths_equals_each_prompt_alone():
    name = "v3_qlora_grouped"
    cfg, params, g = _load(name)
    tokens = np.asarray(g["tokens"])
    lens = np.array([11, 5], np.int32)
    padded = np.where(np.arange(11)[None] < lens[:, None], tokens, 0)
    caches = init_caches(cfg, batch=2, num_pages=12, max_pages=4, page_size=4, dtype=jnp.float32)
    step = jax.jit(lambda p, t, c, n, mode: serve_step(p, t, c, cfg, mode=mode, num_new=n, backend="xla")[:2],
                   static_argnames="mode")
    fwd = jax.jit(lambda p, t: forward(p, t, cfg, backend="xla")[0])
    logits, caches = step(params, jnp.asarray(padded), caches, jnp.asarray(lens), "prefill")
    assert caches[0].seq_lens.tolist() == lens.tolist()
    full, _ = _forward(name)
    assert rel_err(np.asarray(logits)[0], full[0]) <= 1e-5
    alone = fwd(params, jnp.asarray(tokens[1:2, :5]))
    assert rel_err(np.asarray(logits)[1, :5], alone[0]) <= 1e-5
    # the next decode step continues each row from its own length
    nxt = jnp.asarray([[tokens[0, 0]], [tokens[1, 5]]], jnp.int32)
    out, _ = step(params, nxt, caches, None, "decode")
    ref6 = fwd(params, jnp.asarray(tokens[1:2, :6]))
    assert rel_err(np.asarray(out)[1, 0], ref6[0, 5]) <= 1e-5
