"""EPLB applied to the real MoE layer on 8 CPU devices: count load, rebalance, migrate, same output."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.ir.placement import ExpertPlacement
from seekax.layers.eplb import LoadWindow, migrate_expert_weights, rebalance
from seekax.layers.moe import MoeConfig, init_moe_params, moe_layer, moe_reference
from seekax.testing.compare import assert_close

ROUTED = ("w1", "w3", "w2")
GPUS, SLOTS, GROUPS, NODES = 8, 24, 4, 2
CFG = MoeConfig(hidden=32, moe_inter=16, num_experts=16, top_k=4, n_groups=4, topk_group=2, shared=1)


MAXCNT = SLOTS - CFG.num_experts + 1  # fixed log2phy width: one compiled program for every placement


def _program(mesh, specs):
    def body(x, params, log2phy, logcnt):
        y, aux = moe_layer(x, params, cfg=CFG, axis_name="ep", placement=(log2phy, logcnt), transport="padded")
        return y, aux["tokens_per_expert"]

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), specs, P(), P()), out_specs=(P("ep"), P())))


def _run(program, mesh, params, x, placement: ExpertPlacement):
    """moe_layer under shard_map over "ep" with one layer's placement -> (y [T, H], tokens_per_expert [E])."""
    specs = {k: (P("ep") if k in ROUTED else P()) for k in params}
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    x = jax.device_put(x, NamedSharding(mesh, P("ep")))
    padded = placement.padded(MAXCNT)
    rep = NamedSharding(mesh, P())
    log2phy = jax.device_put(jnp.asarray(padded.log2phy[0], jnp.int32), rep)
    logcnt = jax.device_put(jnp.asarray(padded.logcnt[0], jnp.int32), rep)
    return program(x, params, log2phy, logcnt)


def test_rebalance_and_migration_keep_the_moe_output(rng):
    mesh = jax.make_mesh((GPUS,), ("ep",))
    logical = init_moe_params(jax.random.key(3), CFG, dtype=jnp.float32)
    logical["gate_bias"] = logical["gate_bias"].at[:3].add(0.6)  # experts 0-2 hot
    current = ExpertPlacement.identity(1, CFG.num_experts, num_replicas=SLOTS)
    params = {k: (v[current.phy2log[0]] if k in ROUTED else v) for k, v in logical.items()}
    program = _program(mesh, {k: (P("ep") if k in ROUTED else P()) for k in params})
    window = LoadWindow.create(4, 1, CFG.num_experts)
    batches = [jnp.asarray(rng.standard_normal((64, CFG.hidden)), jnp.float32) for _ in range(3)]
    before = []
    for x in batches:  # serving steps: count tokens per logical expert
        y, load = _run(program, mesh, params, x, current)
        window = window.add(np.asarray(load)[None])
        before.append(np.asarray(y))
    new, plan = rebalance(window, current, num_groups=GROUPS, num_nodes=NODES, num_gpus=GPUS)
    assert plan.num_remote > 0
    migrated = dict(params)
    moved = migrate_expert_weights({k: params[k] for k in ROUTED}, plan.src_slot[0], mesh)
    migrated.update(moved)
    per_dev = SLOTS // GPUS
    for k in ROUTED:  # each device holds exactly its new slots' expert weights
        for shard in moved[k].addressable_shards:
            d = shard.index[0].start // per_dev
            np.testing.assert_array_equal(np.asarray(shard.data),
                                          np.asarray(logical[k])[new.phy2log[0, d * per_dev:(d + 1) * per_dev]])
    for x, y_before in zip(batches, before):
        y_after, load = _run(program, mesh, migrated, x, new)
        assert_close(np.asarray(y_after), y_before, rtol=1e-5, atol=1e-5)
        assert_close(np.asarray(y_after), np.asarray(moe_reference(x, logical, cfg=CFG)), rtol=1e-4, atol=1e-4)
    total = np.asarray(window.load())
    assert new.balance(total, GPUS)[0] < current.balance(total, GPUS)[0]  # the point of it all
