"""EPLB at run time: load window, rebalance with the fewest moves, weight migration under shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.ir.placement import ExpertPlacement
from seekax.layers.eplb import (LoadWindow, MigrationPlan, logical_counts, migrate_expert_weights,
                                         rebalance)
from seekax.ops.replica_routing import route_to_replicas
from seekax.schedules.eplb import rebalance_experts

LAYERS, EXPERTS, REPLICAS, GPUS, GROUPS, NODES = 2, 32, 48, 8, 4, 2


def _skewed(rng, shape=(LAYERS, EXPERTS)):
    return np.minimum(rng.zipf(1.4, shape), 10**5)


def test_load_window_ring_under_jit(rng):
    window = LoadWindow.create(3, LAYERS, EXPERTS)
    add = jax.jit(LoadWindow.add)
    steps = [rng.integers(0, 50, (LAYERS, EXPERTS)) for _ in range(5)]
    for counts in steps:
        window = add(window, counts)
    assert int(window.step) == 5 and window.window == 3
    np.testing.assert_array_equal(np.asarray(window.load()), sum(steps[-3:]))
    with pytest.raises(ValueError, match="counts.shape"):
        window.add(np.zeros((LAYERS, EXPERTS + 1)))


def test_logical_counts_from_slot_counts(rng):
    placement = rebalance_experts(_skewed(rng), REPLICAS, GROUPS, NODES, GPUS)
    slot_counts = rng.integers(0, 9, (LAYERS, REPLICAS))
    got = np.asarray(jax.jit(logical_counts, static_argnums=2)(slot_counts, placement.phy2log, EXPERTS))
    want = np.stack([np.bincount(p, weights=c, minlength=EXPERTS) for p, c in zip(placement.phy2log, slot_counts)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("groups, nodes", [(GROUPS, NODES), (3, 2)])  # hierarchical, global
def test_rebalance_keeps_balance_and_moves_fewer(rng, groups, nodes):
    experts = 32 if groups == GROUPS else 30
    first, second = _skewed(rng, (LAYERS, experts)), _skewed(rng, (LAYERS, experts))
    current = rebalance_experts(first, REPLICAS, groups, nodes, GPUS)
    new, plan = rebalance(second, current, num_groups=groups, num_nodes=nodes, num_gpus=GPUS)
    target = rebalance_experts(second, REPLICAS, groups, nodes, GPUS)
    # Same per-GPU loads as EPLB's own answer (only relabelled).
    np.testing.assert_allclose(np.sort(new.gpu_loads(second, GPUS), -1), np.sort(target.gpu_loads(second, GPUS), -1))
    np.testing.assert_array_equal(new.logcnt, target.logcnt)
    # Every slot's source holds the expert the slot needs; untouched slots keep their expert.
    np.testing.assert_array_equal(np.take_along_axis(current.phy2log, plan.src_slot, 1), new.phy2log)
    assert np.array_equal(new.phy2log[~plan.moved], current.phy2log[~plan.moved])
    assert plan.num_moves <= int((target.phy2log != current.phy2log).sum())
    assert plan.num_remote <= plan.num_moves
    # A local source is used whenever the GPU already holds the expert.
    per_gpu = REPLICAS // GPUS
    for layer, slot in np.argwhere(plan.moved):
        gpu = slot // per_gpu
        local = current.phy2log[layer, gpu * per_gpu:(gpu + 1) * per_gpu]
        if new.phy2log[layer, slot] in local:
            assert plan.src_slot[layer, slot] // per_gpu == gpu
    if groups == GROUPS:  # hierarchical: each node still holds whole groups
        group_of = new.phy2log.reshape(LAYERS, nodes, -1) // (experts // groups)
        for layer in range(LAYERS):
            assert sum(len(set(g.tolist())) for g in group_of[layer]) == groups
    # Rebalancing again on the same load moves nothing.
    again, plan2 = rebalance(second, new, num_groups=groups, num_nodes=nodes, num_gpus=GPUS)
    assert plan2.num_moves == 0 and again == new


def test_rebalance_from_window_and_bad_input(rng):
    current = ExpertPlacement.identity(LAYERS, EXPERTS, num_replicas=REPLICAS)
    window = LoadWindow.create(4, LAYERS, EXPERTS).add(_skewed(rng))
    new, plan = rebalance(window, current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)
    assert new.num_replicas == REPLICAS and plan.src_slot.shape == (LAYERS, REPLICAS)
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance(_skewed(rng), current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS, num_replicas=56)
    with pytest.raises(ValueError, match="load.shape"):
        rebalance(_skewed(rng, (LAYERS + 1, EXPERTS)), current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)
    with pytest.raises(ValueError, match="weight"):
        rebalance(-np.ones((LAYERS, EXPERTS)), current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)
    with pytest.raises(ValueError, match="num_gpus"):
        rebalance(_skewed(rng), current, num_groups=GROUPS, num_nodes=NODES, num_gpus=5)
    with pytest.raises(ValueError, match="current"):
        rebalance(_skewed(rng), current.to_tuple(), num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)


def _mesh():
    return jax.make_mesh((GPUS,), ("ep",))


def _moe_standin(mesh, x, topk_idx, topk_w, log2phy, logcnt, w_up, w_down):
    """A small MoE over physical slots under shard_map: each device runs its own slots' FFNs, psum combines.

    x [T, H] and routing replicated; w_up [R, H, F], w_down [R, F, H] sharded over "ep" by slot.
    """
    phys = route_to_replicas(topk_idx, log2phy, logcnt)  # [T, K] physical slots

    def body(x, phys, topk_w, w_up, w_down):
        per_dev = w_up.shape[0]
        first = jax.lax.axis_index("ep") * per_dev
        y = jnp.zeros_like(x)
        for j in range(per_dev):  # local slot j = global slot first + j
            gate = ((phys == first + j) * topk_w).sum(-1)  # [T]
            h = jax.nn.silu(x @ w_up[j])  # [T, F]
            y = y + gate[:, None] * (h @ w_down[j])
        return jax.lax.psum(y, "ep")

    rep, shard = P(), P("ep")
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, rep, shard, shard), out_specs=rep))
    return fn(x, phys, topk_w, w_up, w_down)


def _dense_reference(x, topk_idx, topk_w, up, down):
    """float64 numpy MoE over logical experts: up [E, H, F], down [E, F, H]."""
    x = x.astype(np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, g in zip(topk_idx[t], topk_w[t]):
            if e >= 0:
                h = x[t] @ up[e]
                y[t] += g * ((h / (1 + np.exp(-h))) @ down[e])
    return y


def test_migration_moves_exactly_the_named_weights_and_keeps_moe_output(rng):
    mesh = _mesh()
    hidden, ffn, tokens, top_k = 8, 16, 64, 4
    up = (rng.standard_normal((EXPERTS, hidden, ffn)) / np.sqrt(hidden)).astype(np.float32)
    down = (rng.standard_normal((EXPERTS, ffn, hidden)) / np.sqrt(ffn)).astype(np.float32)
    current = rebalance_experts(_skewed(rng), REPLICAS, GROUPS, NODES, GPUS)
    new, plan = rebalance(_skewed(rng), current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)
    assert plan.num_remote > 0
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    topk = np.stack([rng.choice(EXPERTS, top_k, replace=False) for _ in range(tokens)])
    topk[rng.random(topk.shape) < 0.1] = -1
    topk_w = rng.random((tokens, top_k)).astype(np.float32)
    sharding = NamedSharding(mesh, P("ep"))
    per_dev = REPLICAS // GPUS
    for layer in range(LAYERS):
        old_w = {"up": jax.device_put(up[current.phy2log[layer]], sharding),
                 "down": jax.device_put(down[current.phy2log[layer]], sharding)}
        new_w = migrate_expert_weights(old_w, plan.src_slot[layer], mesh)
        # Every device holds exactly the weights its new placement names.
        for name, table in (("up", up), ("down", down)):
            shards = sorted(new_w[name].addressable_shards, key=lambda s: s.index[0].start)
            assert len(shards) == GPUS
            for d, shard in enumerate(shards):
                want = table[new.phy2log[layer, d * per_dev:(d + 1) * per_dev]]
                np.testing.assert_array_equal(np.asarray(shard.data), want)
        before = _moe_standin(mesh, x, topk, topk_w, current.log2phy[layer], current.logcnt[layer],
                              old_w["up"], old_w["down"])
        after = _moe_standin(mesh, x, topk, topk_w, new.log2phy[layer], new.logcnt[layer],
                             new_w["up"], new_w["down"])
        reference = _dense_reference(x, topk, topk_w, up, down)
        np.testing.assert_allclose(np.asarray(before), reference, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-6, atol=1e-6)


def test_migration_identity_and_bad_input(rng):
    mesh = _mesh()
    w = jax.device_put(rng.standard_normal((REPLICAS, 3)).astype(np.float32), NamedSharding(mesh, P("ep")))
    assert migrate_expert_weights(w, np.arange(REPLICAS), mesh) is w
    reversed_slots = np.arange(REPLICAS)[::-1].copy()  # every slot crosses devices
    np.testing.assert_array_equal(np.asarray(migrate_expert_weights(w, reversed_slots, mesh)), np.asarray(w)[::-1])
    with pytest.raises(ValueError, match="src_slot"):
        migrate_expert_weights(w, np.arange(REPLICAS - 1), mesh)
    with pytest.raises(ValueError, match=r"weights\[0\].shape"):
        migrate_expert_weights(np.asarray(w)[:8], reversed_slots, mesh)
    with pytest.raises(ValueError, match="axis_name"):
        migrate_expert_weights(w, reversed_slots, mesh, axis_name="tp")
    with pytest.raises(ValueError, match="num_gpus"):
        MigrationPlan(src_slot=np.zeros((1, 6), np.int64), num_gpus=4)


def test_overlap_counts_shared_experts_per_gpu_pair(rng):
    from seekax.layers.eplb import _overlap

    experts, replicas, gpus = 12, 24, 6
    cur, tgt = rng.integers(0, experts, replicas), rng.integers(0, experts, replicas)
    count = lambda p: np.stack([np.bincount(r, minlength=experts) for r in p.reshape(gpus, -1)])  # noqa: E731
    want = np.minimum(count(cur)[:, None, :], count(tgt)[None, :, :]).sum(-1)
    np.testing.assert_array_equal(_overlap(cur, tgt, gpus), want)


def test_migration_all_layers_at_once_with_fixed_capacity(rng):
    from seekax.layers.eplb import migration_capacity

    mesh = _mesh()
    table = rng.standard_normal((LAYERS, EXPERTS, 2, 3)).astype(np.float32)  # per-layer expert weights
    current = rebalance_experts(_skewed(rng), REPLICAS, GROUPS, NODES, GPUS)
    new, plan = rebalance(_skewed(rng), current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)
    old = np.stack([table[layer][current.phy2log[layer]] for layer in range(LAYERS)])  # [L, R, 2, 3]
    sharded = jax.device_put(old, NamedSharding(mesh, P(None, "ep")))
    need = migration_capacity(plan.src_slot, GPUS)
    out = migrate_expert_weights(sharded, plan.src_slot, mesh, capacity=need + 2)
    want = np.stack([table[layer][new.phy2log[layer]] for layer in range(LAYERS)])
    np.testing.assert_array_equal(np.asarray(out), want)
    per_layer = migrate_expert_weights(old[0], plan.src_slot[0], mesh, capacity=need + 2)
    np.testing.assert_array_equal(np.asarray(per_layer), want[0])
    assert need > 1  # skewed loads move several experts between some device pair
    with pytest.raises(ValueError, match="capacity"):
        migrate_expert_weights(sharded, plan.src_slot, mesh, capacity=need - 1)


def test_migration_of_a_mixed_dtype_pytree_equals_numpy(rng):
    """A user's pytree: f32, bf16, f16, fp8, int8, bool leaves of different widths, sharded or on the host."""
    mesh = _mesh()
    current = rebalance_experts(np.ones((LAYERS, EXPERTS)), REPLICAS, GROUPS, NODES, GPUS)
    new, plan = rebalance(_skewed(rng), current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)
    host = {"w1": rng.standard_normal((LAYERS, REPLICAS, 4, 3)).astype(np.float32),
            "w2": [rng.standard_normal((LAYERS, REPLICAS, 5)).astype(jnp.bfloat16),
                   rng.standard_normal((LAYERS, REPLICAS)).astype(np.float16)],
            "scale": rng.standard_normal((LAYERS, REPLICAS, 2)).astype(jnp.float8_e4m3fn),
            "ids": current.phy2log.astype(np.int8), "mask": current.phy2log % 2 == 0}
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "ep")))  # noqa: E731
    weights = jax.tree.map(put, host)
    weights["mask"] = host["mask"]  # a host leaf travels too
    out = migrate_expert_weights(weights, plan.src_slot, mesh)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(host)):
        index = plan.src_slot.reshape(plan.src_slot.shape + (1,) * (want.ndim - 2))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32),
                                      np.take_along_axis(want, index, 1).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["ids"]), new.phy2log)


def test_migration_of_a_python_scalar_leaf_is_a_clear_error():
    """A Python float leaf (no slot axis) is a ValueError naming the leaf, not an AttributeError."""
    weights = {"lr": 3.0, "w": np.zeros((REPLICAS, 2), np.float32)}
    with pytest.raises(ValueError, match=r"^weights\[0\].shape=\(\): expected \(48,\)"):
        migrate_expert_weights(weights, np.arange(REPLICAS)[::-1].copy(), _mesh())


def test_load_window_rejects_float_counts():
    """Float counts (e.g. summed router probabilities) would be truncated to int32 silently: a ValueError."""
    window = LoadWindow.create(2, LAYERS, EXPERTS)
    with pytest.raises(ValueError, match=r"^counts.dtype='float32': expected an integer dtype"):
        window.add(jnp.full((LAYERS, EXPERTS), 0.4))
    with pytest.raises(ValueError, match=r"^counts.dtype"):
        jax.jit(LoadWindow.add)(window, np.full((LAYERS, EXPERTS), 2.7))
    window = window.add(np.full((LAYERS, EXPERTS), 3, np.int64)).add(jnp.full((LAYERS, EXPERTS), 2, jnp.uint8))
    np.testing.assert_array_equal(np.asarray(window.load()), 5)
