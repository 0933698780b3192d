"""moe_layer under shard_map equals the dense single-device reference (forward and jax.grad), EP 1-8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.layers.moe import MoeConfig, init_moe_params, moe_layer, moe_reference, route
from seekax.testing.compare import assert_close, calc_diff

CFG = MoeConfig(hidden=32, moe_inter=16, num_experts=16, top_k=4, n_groups=4, topk_group=2, shared=1,
                routed_scaling_factor=2.5)
ROUTED = ("w1", "w3", "w2")


def gate_numpy(x, gate, bias, cfg):
    """DeepSeek-V3's Gate written as loops: sigmoid, top-2-sum group scores, group mask, biased top-k."""
    x, gate, bias = (np.asarray(a, np.float64) for a in (x, gate, bias))
    per = cfg.num_experts // cfg.n_groups
    idx, ws = [], []
    for row in x:
        s = 1 / (1 + np.exp(-(gate @ row)))
        b = s + bias
        gscore = [np.sort(b[g * per:(g + 1) * per])[-2:].sum() for g in range(cfg.n_groups)]
        groups = np.argsort(-np.array(gscore), kind="stable")[:cfg.topk_group]
        masked = np.full_like(b, -np.inf)
        for g in groups:
            masked[g * per:(g + 1) * per] = b[g * per:(g + 1) * per]
        top = np.argsort(-masked, kind="stable")[:cfg.top_k]
        w = s[top] / s[top].sum() * cfg.routed_scaling_factor
        idx.append(top)
        ws.append(w)
    return np.array(idx), np.array(ws)


V3 = MoeConfig(hidden=64, moe_inter=16, num_experts=256, top_k=8, n_groups=8, topk_group=4, shared=1,
               routed_scaling_factor=2.5)   # DeepSeek-V3's routing shape (small hidden)


@pytest.mark.parametrize("cfg", [CFG, V3], ids=["small", "v3_routing"])
def test_route_matches_deepseek_gate(rng, cfg):
    x = rng.standard_normal((24, cfg.hidden)).astype(np.float32)
    params = init_moe_params(jax.random.key(1), cfg)
    bias = rng.standard_normal(cfg.num_experts).astype(np.float32) * 0.3   # bias steers selection only
    idx, w = route(jnp.asarray(x), params["gate"], jnp.asarray(bias), cfg)
    want_idx, want_w = gate_numpy(x, params["gate"], bias, cfg)
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(want_idx, 1))
    order = lambda i, v: np.take_along_axis(np.asarray(v), np.argsort(np.asarray(i), 1), 1)  # noqa: E731
    np.testing.assert_allclose(order(idx, w), order(want_idx, want_w), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w).sum(1), cfg.routed_scaling_factor, rtol=1e-5)
    groups = np.asarray(idx) // (cfg.num_experts // cfg.n_groups)
    assert max(len(set(row)) for row in groups.tolist()) <= cfg.topk_group


def ep_moe(mesh, cfg, params, x, *, placement=None, transport="padded", with_grad=False):
    """Run moe_layer over mesh ("ep",): tokens and routed weights split, the rest replicated."""
    specs = {k: (P("ep") if k in ROUTED else P()) for k in params}
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    params = {k: put(v, specs[k]) for k, v in params.items()}
    x = put(x, P("ep"))

    def body(x, params):
        y, aux = moe_layer(x, params, cfg=cfg, axis_name="ep", placement=placement, transport=transport)
        return y, aux["tokens_per_expert"]

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), specs), out_specs=(P("ep"), P()))
    if not with_grad:
        return jax.jit(f)(x, params)
    r = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)
    loss = lambda x, params: (f(x, params)[0].astype(jnp.float32) * r).sum()  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params), r


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
def test_moe_layer_matches_reference_fwd_and_grad(rng, ep_size):
    n = 32
    params = init_moe_params(jax.random.key(ep_size), CFG, dtype=jnp.float32)
    params["gate_bias"] = jnp.asarray(rng.standard_normal(CFG.num_experts) * 0.2, jnp.float32)
    x = jnp.asarray(rng.standard_normal((n, CFG.hidden)), jnp.float32)
    mesh = jax.make_mesh((ep_size,), ("ep",))
    y, load = ep_moe(mesh, CFG, params, x)
    want = moe_reference(x, params, cfg=CFG)
    assert_close(np.asarray(y), want, rtol=1e-5, atol=1e-5, name="y")
    idx, _ = route(x, params["gate"], params["gate_bias"], CFG)
    np.testing.assert_array_equal(np.asarray(load), np.bincount(np.asarray(idx).ravel(), minlength=CFG.num_experts))
    (gx, gp), r = ep_moe(mesh, CFG, params, x, with_grad=True)
    wx, wp = jax.grad(lambda x, p: (moe_reference(x, p, cfg=CFG) * r).sum(), argnums=(0, 1))(x, params)
    assert_close(np.asarray(gx), wx, rtol=1e-4, atol=1e-5, name="dx")
    for k in params:
        if k != "gate_bias":
            assert_close(np.asarray(gp[k]), wp[k], rtol=1e-4, atol=1e-5, name=f"d{k}")


def test_moe_layer_single_device_no_axis(rng):
    params = init_moe_params(jax.random.key(0), CFG, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((8, CFG.hidden)), jnp.float32)
    y, aux = jax.jit(lambda x, p: moe_layer(x, p, cfg=CFG))(x, params)
    assert_close(np.asarray(y), moe_reference(x, params, cfg=CFG), rtol=1e-5, atol=1e-5)
    assert int(aux["num_dropped"]) == 0 and int(aux["tokens_per_expert"].sum()) == 8 * CFG.top_k


def test_moe_layer_low_latency_and_bf16(rng):
    params = init_moe_params(jax.random.key(3), CFG, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((32, CFG.hidden)), jnp.bfloat16)
    mesh = jax.make_mesh((4,), ("ep",))
    want = np.asarray(moe_reference(x, params, cfg=CFG))
    for transport in ("padded", "low_latency"):
        y, _ = ep_moe(mesh, CFG, params, x, transport=transport)
        assert y.dtype == jnp.bfloat16
        assert_close(np.asarray(y), want, rtol=4 / 128, atol=4 / 128, max_rel_err=1e-2, name=transport)


def test_moe_layer_with_eplb_placement(rng):
    """8 logical experts on 12 physical slots (hot experts 0-3 replicated), 3 slots a rank on 4 ranks."""
    cfg = MoeConfig(hidden=32, moe_inter=16, num_experts=8, top_k=2, n_groups=1, topk_group=1, shared=0)
    phy2log = np.array([0, 4, 1, 5, 2, 6, 3, 7, 0, 1, 2, 3])
    logcnt = np.bincount(phy2log, minlength=8)
    log2phy = np.full((8, 2), -1)
    for e in range(8):
        slots = np.flatnonzero(phy2log == e)
        log2phy[e, :len(slots)] = slots
    logical = init_moe_params(jax.random.key(5), cfg, dtype=jnp.float32)
    physical = {k: (v[phy2log] if k in ROUTED else v) for k, v in logical.items()}
    x = jnp.asarray(rng.standard_normal((32, cfg.hidden)), jnp.float32)
    mesh = jax.make_mesh((4,), ("ep",))
    placement = (jnp.asarray(log2phy, jnp.int32), jnp.asarray(logcnt, jnp.int32))
    y, load = ep_moe(mesh, cfg, physical, x, placement=placement)
    assert_close(np.asarray(y), moe_reference(x, logical, cfg=cfg), rtol=1e-5, atol=1e-5)
    idx, _ = route(x, logical["gate"], logical["gate_bias"], cfg)
    np.testing.assert_array_equal(np.asarray(load), np.bincount(np.asarray(idx).ravel(), minlength=8))


def test_moe_layer_fp8(rng):
    cfg = MoeConfig(hidden=128, moe_inter=128, num_experts=8, top_k=2, n_groups=2, topk_group=1, shared=1,
                    fp8=True)
    params = init_moe_params(jax.random.key(9), cfg, dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((16, cfg.hidden)), jnp.bfloat16)
    want = np.asarray(moe_reference(x, params, cfg=cfg))
    mesh = jax.make_mesh((4,), ("ep",))
    for transport in ("padded", "low_latency"):
        y, _ = ep_moe(mesh, cfg, params, x, transport=transport)
        assert calc_diff(np.asarray(y), want) < 1e-3, transport


def test_moe_config_errors():
    with pytest.raises(ValueError, match="num_experts"):
        MoeConfig(hidden=8, moe_inter=8, num_experts=10, top_k=2, n_groups=4)
    with pytest.raises(ValueError, match="topk_group"):
        MoeConfig(hidden=8, moe_inter=8, num_experts=8, top_k=2, n_groups=2, topk_group=3)
    with pytest.raises(ValueError, match="top_k"):
        MoeConfig(hidden=8, moe_inter=8, num_experts=8, top_k=5, n_groups=4, topk_group=2)
    with pytest.raises(ValueError, match="hidden"):
        MoeConfig(hidden=96, moe_inter=128, num_experts=8, top_k=2, fp8=True)
    params = init_moe_params(jax.random.key(0), CFG)
    with pytest.raises(ValueError, match="x.shape"):
        moe_layer(jnp.zeros((4, 7)), params, cfg=CFG)
    with pytest.raises(ValueError, match="w1"):
        moe_layer(jnp.zeros((4, 32)), {**params, "w1": params["w1"][:3]}, cfg=CFG)


def test_moe_layer_on_a_dp_ep_mesh(rng):
    """moe_layer inside shard_map over a ("dp", "ep") mesh: tokens split over both axes, experts over "ep"."""
    mesh = jax.make_mesh((2, 4), ("dp", "ep"))
    params = init_moe_params(jax.random.key(11), CFG, dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((64, CFG.hidden)), jnp.float32)
    specs = {k: (P("ep") if k in ROUTED else P()) for k in params}
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731

    def body(x, params):
        y, aux = moe_layer(x, params, cfg=CFG, axis_name="ep")
        return y, jax.lax.psum(aux["tokens_per_expert"], "dp")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(("dp", "ep")), specs), out_specs=(P(("dp", "ep")), P())))
    y, load = f(put(x, P(("dp", "ep"))), {k: put(v, specs[k]) for k, v in params.items()})
    assert_close(np.asarray(y), moe_reference(x, params, cfg=CFG), rtol=1e-5, atol=1e-5)
    assert int(np.asarray(load).sum()) == 64 * CFG.top_k


@pytest.mark.parametrize("transport,kernels,ragged", [("ragged", 4, 4), ("low_latency", 3, 0)])
def test_moe_layer_fp8_cross_lowers_for_hopper(transport, kernels, ragged):
    """The whole FP8 layer on 8 GPUs, lowered on this CPU: ragged_all_to_all (x, scales, ids+weights, combine)
    and Mosaic kernels (permute + 3 contiguous FP8 GEMMs; or 3 masked FP8 GEMMs), all within shared memory."""
    from seekax.testing.kernels import cross_lower

    cfg = MoeConfig(hidden=1024, moe_inter=256, num_experts=64, top_k=8, n_groups=8, topk_group=4, fp8=True)
    mesh = jax.make_mesh((8,), ("ep",))
    params = jax.eval_shape(lambda: init_moe_params(jax.random.key(0), cfg))
    specs = {k: (P("ep") if k in ROUTED else P()) for k in params}
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))  # noqa: E731
    body = lambda x, p: moe_layer(x, p, cfg=cfg, axis_name="ep", transport=transport, backend="mosaic")[0]  # noqa: E731
    f = jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), specs), out_specs=P("ep"))
    lowered = cross_lower(f, jax.ShapeDtypeStruct((8 * 128, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("ep"))),
                          {k: sds(v, specs[k]) for k, v in params.items()})
    assert lowered.emit("stablehlo").count("ragged_all_to_all") == ragged
    assert len(lowered.reports) == kernels and all(r.fits_smem and r.tma for r in lowered.reports)


@pytest.mark.parametrize("method, norm", [("greedy", False), ("group_limited_greedy", False),
                                          ("group_limited_greedy", True)])
def test_v2_softmax_routing_matches_numpy(rng, method, norm):
    """DeepSeek-V2's gate: softmax over all experts, top-k (greedy) or top-k inside the topk_group groups with
    the best single score; weights the softmax scores (renormalised if norm_topk_prob) times the scaling."""
    cfg = MoeConfig(hidden=32, moe_inter=16, num_experts=16, top_k=3, n_groups=4, topk_group=2, shared=2,
                    scoring="softmax", topk_method=method, norm_topk_prob=norm, routed_scaling_factor=2.0)
    x = rng.standard_normal((20, cfg.hidden)).astype(np.float32)
    gate = rng.standard_normal((cfg.num_experts, cfg.hidden)).astype(np.float32)
    idx, w = route(jnp.asarray(x), jnp.asarray(gate), jnp.zeros(cfg.num_experts), cfg)
    logits = x.astype(np.float64) @ gate.T.astype(np.float64)
    s = np.exp(logits - logits.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    for t in range(x.shape[0]):
        cand = s[t].copy()
        if method == "group_limited_greedy":
            best = np.argsort(-s[t].reshape(4, 4).max(1))[:2]
            cand = np.where(np.isin(np.arange(16) // 4, best), cand, -1.0)
        top = np.sort(np.argsort(-cand)[:3])
        assert np.sort(np.asarray(idx[t])).tolist() == top.tolist()
        want = s[t, top] / (s[t, top].sum() if norm else 1.0) * 2.0
        np.testing.assert_allclose(np.sort(np.asarray(w[t])), np.sort(want), rtol=1e-5)


def test_bad_routing_choices_are_named():
    with pytest.raises(ValueError, match="scoring"):
        MoeConfig(hidden=8, moe_inter=8, num_experts=8, top_k=2, scoring="relu")
    with pytest.raises(ValueError, match="topk_method"):
        MoeConfig(hidden=8, moe_inter=8, num_experts=8, top_k=2, topk_method="aux")


@pytest.mark.parametrize("transport", ["padded", "low_latency"])
def test_moe_layer_trains_routed_experts_through_fp8(rng, transport):
    """Routed (and shared) weights wrapped in Fp8Train: forward, dgrad and wgrad of every expert GEMM in FP8
    (`grouped_fp8_linear`), the weights and their gradients float; within FP8 error of the float64-accumulated
    float reference, forward and every gradient, over 4 EP ranks."""
    from seekax.layers.linear import Fp8Train

    cfg = MoeConfig(hidden=128, moe_inter=128, num_experts=8, top_k=2, n_groups=2, topk_group=1, shared=1)
    params = init_moe_params(jax.random.key(5), cfg, dtype=jnp.float32)
    wrapped = {k: (Fp8Train(v) if k in ROUTED or k.startswith("shared_") else v) for k, v in params.items()}
    x = jnp.asarray(rng.standard_normal((64, cfg.hidden)), jnp.float32)
    mesh = jax.make_mesh((4,), ("ep",))
    y, _ = ep_moe(mesh, cfg, wrapped, x, transport=transport)
    want = moe_reference(x, params, cfg=cfg)
    assert calc_diff(np.asarray(y), want) < 1e-3
    (gx, gp), r = ep_moe(mesh, cfg, wrapped, x, transport=transport, with_grad=True)
    wx, wp = jax.grad(lambda x, p: (moe_reference(x, p, cfg=cfg) * r).sum(), argnums=(0, 1))(x, params)
    assert calc_diff(np.asarray(gx), wx) < 2e-3
    for k in ROUTED + ("shared_w1", "shared_w3", "shared_w2"):
        assert isinstance(gp[k], Fp8Train) and gp[k].w.dtype == jnp.float32, k
        assert calc_diff(np.asarray(gp[k].w), wp[k]) < 3e-3, k
