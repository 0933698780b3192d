"""rebalance_experts: exact on the original's reference cases, invariants on random inputs, clear errors."""

import json
import pathlib

import numpy as np
import pytest

from seekax.ir.placement import ExpertPlacement
from seekax.schedules.eplb import (balanced_packing, policy, rebalance_experts, rebalance_experts_tuple,
                                   replicate_experts)

with open(pathlib.Path(__file__).resolve().parents[1] / "data" / "eplb_cases.jsonl") as _f:
    CASES = [json.loads(line) for line in _f]


def _args(case):
    return case["weight"], case["num_replicas"], case["num_groups"], case["num_nodes"], case["num_gpus"]


@pytest.mark.parametrize("case", CASES, ids=[c["case_id"] for c in CASES])
def test_reference_case_exact(case):
    phy2log, log2phy, logcnt = rebalance_experts_tuple(*_args(case))
    assert policy(case["num_groups"], case["num_nodes"]) == case["policy"]
    np.testing.assert_array_equal(phy2log, case["phy2log_stable_sort"])
    np.testing.assert_array_equal(log2phy, case["log2phy_stable_sort"])
    np.testing.assert_array_equal(logcnt, case["logcnt_stable_sort"])
    # The parts of the unstable-sort original that do not depend on tie order.
    np.testing.assert_array_equal(logcnt, case["logcnt"])
    placement = ExpertPlacement.from_tuple((phy2log, log2phy, logcnt))
    np.testing.assert_allclose(placement.balance(case["weight"], case["num_gpus"]), case["max_over_mean_gpu_load"],
                               rtol=1e-6)
    np.testing.assert_allclose(np.sort(placement.gpu_loads(case["weight"], case["num_gpus"]), -1),
                               np.sort(np.asarray(case["gpu_loads"]), -1), rtol=1e-6)


def _random_weight(rng, layers, experts, kind):
    if kind == "uniform":
        return rng.integers(0, 1000, (layers, experts))
    if kind == "zipf":
        return np.minimum(rng.zipf(1.5, (layers, experts)), 10**6)
    if kind == "float":
        return rng.random((layers, experts)) * 100
    if kind == "zeros":
        return np.zeros((layers, experts), np.int64)
    return np.full((layers, experts), 7)


@pytest.mark.parametrize("kind", ["uniform", "zipf", "float", "zeros", "equal"])
@pytest.mark.parametrize("experts, replicas, groups, nodes, gpus", [
    (16, 16, 4, 2, 4), (16, 24, 4, 2, 8), (32, 48, 8, 4, 8), (24, 36, 3, 2, 6), (64, 80, 4, 2, 16), (12, 15, 1, 1, 5),
])
def test_invariants_on_random_inputs(rng, kind, experts, replicas, groups, nodes, gpus):
    layers = int(rng.integers(1, 5))
    weight = _random_weight(rng, layers, experts, kind)
    p = rebalance_experts(weight, replicas, groups, nodes, gpus)  # construction validates log2phy vs phy2log
    assert p.phy2log.shape == (layers, replicas) and p.logcnt.shape == (layers, experts)
    for row, counts in zip(p.phy2log, p.logcnt):
        np.testing.assert_array_equal(np.bincount(row, minlength=experts), counts)
    assert p.logcnt.min() >= 1 and p.logcnt.sum(1).tolist() == [replicas] * layers
    assert p.max_replicas == p.logcnt.max() and np.all(p.log2phy[p.log2phy >= 0] < replicas)
    assert p.slots_per_gpu(gpus) == replicas // gpus
    # Deterministic: the same input gives the same placement.
    assert p == rebalance_experts(weight, replicas, groups, nodes, gpus)
    if policy(groups, nodes) == "hierarchical":  # every GPU's experts come from groups packed onto its node
        group_of = p.phy2log.reshape(layers, nodes, -1) // (experts // groups)
        for layer in range(layers):
            node_groups = [set(group_of[layer, n].tolist()) for n in range(nodes)]
            assert sum(len(g) for g in node_groups) == groups  # each group on exactly one node


def test_balance_improves_on_skewed_load(rng):
    weight = np.minimum(rng.zipf(1.3, (4, 64)), 10**5).astype(np.float64)
    p = rebalance_experts(weight, 80, 8, 2, 16)
    plain = ExpertPlacement.identity(4, 64, num_replicas=80)  # round-robin replicas, no balancing
    assert np.all(p.balance(weight, 16) <= plain.balance(weight, 16) + 1e-9)


def test_helpers_tie_rules():
    # Zero weights: the lowest-index non-full pack wins every tie, so packs fill one after another.
    pack, rank = balanced_packing(np.zeros((1, 4), np.float32), 2)
    assert pack.tolist() == [[0, 0, 1, 1]] and rank.tolist() == [[0, 1, 0, 1]]
    # One item per pack: identity, not greedy order.
    pack, rank = balanced_packing(np.array([[1.0, 5.0, 3.0]], np.float32), 3)
    assert pack.tolist() == [[0, 1, 2]] and rank.tolist() == [[0, 0, 0]]
    phy2log, rank, logcnt = replicate_experts(np.array([[4.0, 4.0, 1.0]], np.float32), 6)
    assert phy2log.tolist() == [[0, 1, 2, 0, 1, 0]] and rank.tolist() == [[0, 0, 0, 1, 1, 2]]
    assert logcnt.tolist() == [[3, 2, 1]]


@pytest.mark.parametrize("args, match", [
    (dict(num_replicas=18), "num_replicas"),  # not a multiple of num_gpus
    (dict(num_replicas=8), "num_replicas"),  # fewer replicas than experts
    (dict(weight=-np.ones((2, 16))), "weight"),
    (dict(weight=np.ones(16)), "weight.shape"),
    (dict(weight=np.full((2, 16), np.nan)), "weight"),
    (dict(weight=np.ones((2, 16), bool)), "weight.dtype"),
    (dict(num_gpus=3), "num_gpus"),  # not a multiple of num_nodes
    (dict(num_groups=3, num_nodes=1), "num_groups"),  # groups do not divide experts
    (dict(num_nodes=0), "num_nodes"),
    (dict(num_gpus=4.0), "num_gpus"),
])
def test_bad_input_names_argument(args, match):
    call = dict(weight=np.ones((2, 16)), num_replicas=24, num_groups=4, num_nodes=2, num_gpus=8) | args
    with pytest.raises(ValueError, match=match):
        rebalance_experts(**call)
