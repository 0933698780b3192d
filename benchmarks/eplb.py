"""EPLB at DeepSeek-V3 sizes: time per rebalance_experts call and balance (max/mean GPU load).

Speed is reported as ratios against (a) the original EPLB's published times on a 2-core machine (reference
README: 0.34-0.49 s hierarchical, 1.66 s global for 61 x 256) and (b) a same-run baseline: the original
algorithm written as plain per-layer, per-item Python loops over numpy (torch is not installed here), whose
output is checked equal to ours. Also times `rebalance` with its migration plan against a perturbed load.

  .venv/bin/python benchmarks/eplb.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, parser  # noqa: E402

from seekax.layers.eplb import rebalance  # noqa: E402
from seekax.schedules.eplb import policy, rebalance_experts, rebalance_experts_tuple  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "eplb_cases.jsonl"  # see tests/data/README.md
ORIGINAL_SECONDS = {"hierarchical": (0.34, 0.49), "global": (1.66, 1.66)}  # published, 61 x 256, 2 cores

# (replicas, groups, nodes, gpus): DeepSeek-V3 has 256 routed experts in 8 groups.
CONFIGS = [(320, 8, 4, 32), (288, 8, 4, 32), (320, 8, 8, 64), (320, 8, 16, 64), (288, 8, 16, 32)]


# ---- the original algorithm as plain loops (same-run baseline) ----------------------------------------------
def _loop_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        return np.tile(np.arange(items), (rows, 1)), np.zeros((rows, items), np.int64)
    pack_index = np.full((rows, items), -1, np.int64)
    rank_in_pack = np.full((rows, items), -1, np.int64)
    for i in range(rows):
        loads = [np.float32(0)] * num_packs
        counts = [0] * num_packs
        for item in np.argsort(-weight[i], kind="stable"):
            pack = min((p for p in range(num_packs) if counts[p] < per_pack), key=loads.__getitem__)
            pack_index[i, item] = pack
            rank_in_pack[i, item] = counts[pack]
            loads[pack] = np.float32(loads[pack] + weight[i, item])
            counts[pack] += 1
    return pack_index, rank_in_pack


def _loop_replicate(weight: np.ndarray, num_phy: int):
    rows, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy), (rows, 1))
    rank = np.zeros((rows, num_phy), np.int64)
    logcnt = np.ones((rows, num_log), np.int64)
    arange = np.arange(rows)
    for i in range(num_log, num_phy):
        hot = (weight / logcnt.astype(np.float32)).argmax(-1)
        phy2log[:, i] = hot
        rank[:, i] = logcnt[arange, hot]
        logcnt[arange, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm):
    inv = np.empty_like(perm)
    for r in range(perm.shape[0]):
        inv[r, perm[r]] = np.arange(perm.shape[1])
    return inv


def original_loops(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """The original algorithm, unvectorised across layers: returns (phy2log, log2phy, logcnt)."""
    weight = np.asarray(weight, np.float32)
    layers, num_log = weight.shape
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    group_size, per_node = num_log // num_groups, num_groups // num_nodes
    tokens_per_group = weight.reshape(layers, num_groups, group_size).sum(-1, dtype=np.float32)
    gpack, grank = _loop_packing(tokens_per_group, num_nodes)
    log2mlog = (((gpack * per_node + grank) * group_size)[..., None] + np.arange(group_size)).reshape(layers, -1)
    mlog2log = _inverse(log2mlog)
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = _loop_replicate(tokens_per_mlog, num_replicas // num_nodes)
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, -1)
    pack, rank = _loop_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * (num_replicas // num_gpus) + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1).reshape(layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + np.arange(0, num_log, num_log // num_nodes)[None, :, None]).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, -1)
    maxcnt = int(logcnt.max())
    log2phy = np.full((layers, num_log * maxcnt), -1, np.int64)
    for layer in range(layers):
        log2phy[layer, phy2log[layer] * maxcnt + pphyrank[layer]] = np.arange(num_replicas)
    return phy2log, log2phy.reshape(layers, num_log, maxcnt), logcnt


# ---- measurement ----------------------------------------------------------------------------------------------
def _median_seconds(fn, *args, iters: int) -> float:
    fn(*args)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _weights(quick: bool) -> np.ndarray:
    if REFERENCE.is_file():  # the DeepSeek-V3-sized reference case: 61 x 256 token counts
        with REFERENCE.open() as f:
            weight = np.asarray([json.loads(line) for line in f][-1]["weight"])
    else:
        weight = np.minimum(np.random.default_rng(0).zipf(1.3, (61, 256)), 10**5)
    return weight[:4] if quick else weight


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    weight = _weights(args.quick)
    layers = weight.shape[0]
    iters = 3 if args.quick else 10
    perturbed = (weight * np.random.default_rng(1).uniform(0.5, 1.5, weight.shape)).astype(np.int64)
    rows = []
    for replicas, groups, nodes, gpus in CONFIGS[:2] if args.quick else CONFIGS:
        kind = policy(groups, nodes)
        ours = _median_seconds(rebalance_experts_tuple, weight, replicas, groups, nodes, gpus, iters=iters)
        loops = _median_seconds(original_loops, weight, replicas, groups, nodes, gpus, iters=max(1, iters // 5))
        same = all(np.array_equal(a, b) for a, b in zip(rebalance_experts_tuple(weight, replicas, groups, nodes, gpus),
                                                        original_loops(weight, replicas, groups, nodes, gpus)))
        placement = rebalance_experts(weight, replicas, groups, nodes, gpus)
        lo, hi = ORIGINAL_SECONDS[kind]
        t0 = time.perf_counter()
        _, plan = rebalance(perturbed, placement, num_groups=groups, num_nodes=nodes, num_gpus=gpus)
        plan_s = time.perf_counter() - t0
        naive = int((rebalance_experts(perturbed, replicas, groups, nodes, gpus).phy2log != placement.phy2log).sum())
        rows.append({
            "layers": layers, "replicas": replicas, "groups": groups, "nodes": nodes, "gpus": gpus, "policy": kind,
            "ms_per_call": ours * 1e3, "loop_baseline_ms": loops * 1e3, "x_vs_loops": loops / ours,
            "x_vs_original_min": (lo / ours) if layers == 61 else float("nan"),
            "x_vs_original_max": (hi / ours) if layers == 61 else float("nan"),
            "same_as_loops": same,
            "balance_mean": float(placement.balance(weight, gpus).mean()),
            "balance_worst": float(placement.balance(weight, gpus).max()),
            "rebalance_plan_ms": plan_s * 1e3, "moves": plan.num_moves, "moves_remote": plan.num_remote,
            "moves_naive": naive,
        })
    emit("eplb", rows, args.json)


if __name__ == "__main__":
    main()
