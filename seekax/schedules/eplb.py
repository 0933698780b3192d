"""EPLB: replicate heavy experts and pack the replicas onto GPUs so every GPU gets a similar load.

The algorithm of DeepSeek's EPLB (github.com/deepseek-ai/EPLB), re-derived and vectorised across layers:
  hierarchical (num_groups % num_nodes == 0): Step 1 pack expert groups onto nodes, Step 2 replicate experts
  within each node, Step 3 pack the node's replicas onto its GPUs;
  global (otherwise): the same with one group and one node.
Greedy loops run over items (sequential by nature) but every step handles all layers (and nodes) at once.
Tie rules are fixed so results are reproducible: stable descending sort, first index on argmax, lowest
index among non-full packs on argmin, loads accumulated in float32 in the greedy order.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from seekax.ir.placement import ExpertPlacement
from seekax.ir.validate import check_int, fail


def policy(num_groups: int, num_nodes: int) -> str:
    """"hierarchical" when expert groups divide evenly over nodes, else "global"."""
    return "hierarchical" if num_groups % num_nodes == 0 else "global"


def _is_real(dtype: np.dtype) -> bool:
    """Integer or floating, ml_dtypes' bfloat16/float8 included (numpy's issubdtype does not know them)."""
    if dtype.kind == "b":
        return False
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating):
        return True
    try:
        ml_dtypes.finfo(dtype)
    except (ValueError, TypeError):
        return False
    return dtype.kind == "V"  # ml_dtypes floats are numpy void-kind types; complex is not


def check_rebalance_args(weight: Any, num_replicas: int, num_groups: int, num_nodes: int,
                         num_gpus: int) -> np.ndarray:
    """The one validation point: returns weight as float32 [layers, experts]; ValueError naming the argument."""
    try:
        array = np.asarray(weight)
    except Exception:  # noqa: BLE001 - ragged lists and other non-arrays
        raise fail("weight", type(weight).__name__, "a [layers, experts] array of loads") from None
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise fail("weight.shape", array.shape, "(layers>=1, experts>=1)")
    if not _is_real(array.dtype):
        raise fail("weight.dtype", str(array.dtype), "an integer or floating dtype")
    wide = array.astype(np.float64)
    if not np.all(np.isfinite(wide)):
        raise fail("weight", "non-finite values", "finite loads")
    if np.any(wide < 0):
        raise fail("weight", f"min {wide.min()}", "non-negative loads (token counts)")
    # The greedy loops sum loads in float32: a larger total would overflow to inf and break the packing.
    total = wide.sum(-1).max()
    if total > np.finfo(np.float32).max:
        raise fail("weight", f"a layer total of {total:.3g}", "loads summing to at most float32's max "
                   f"{np.finfo(np.float32).max:.3g} per layer (EPLB accumulates in float32; rescale them)")
    num_experts = array.shape[1]
    num_replicas = check_int("num_replicas", num_replicas, min_value=1)
    num_groups = check_int("num_groups", num_groups, min_value=1)
    num_nodes = check_int("num_nodes", num_nodes, min_value=1)
    num_gpus = check_int("num_gpus", num_gpus, min_value=1)
    if num_replicas < num_experts:
        raise fail("num_replicas", num_replicas, f">= the number of logical experts ({num_experts})")
    if num_replicas % num_gpus:
        raise fail("num_replicas", num_replicas, f"a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise fail("num_gpus", num_gpus, f"a multiple of num_nodes={num_nodes}")
    if policy(num_groups, num_nodes) == "hierarchical" and num_experts % num_groups:
        raise fail("num_groups", num_groups, f"a divisor of the number of logical experts ({num_experts})")
    return array.astype(np.float32)


def _inverse(perm: np.ndarray) -> np.ndarray:
    """perm: [rows, n] permutations -> their inverses."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy: items in descending weight go to the lightest pack that still has room.

    weight: [rows, items] float32, items % num_packs == 0 -> (pack_index, rank_in_pack), both [rows, items].
    Each pack receives items / num_packs items.
    """
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:  # one item per pack: item i -> pack i (the original's shortcut, not the greedy order)
        return np.broadcast_to(np.arange(items), weight.shape).copy(), np.zeros(weight.shape, np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")  # [rows, items] stable descending
    sorted_w = np.ascontiguousarray(np.take_along_axis(weight, order, axis=1).T)  # [items, rows]
    base = np.arange(rows) * num_packs  # flat offset of each row's packs
    load = np.zeros(rows * num_packs, np.float32)  # accumulated load per (row, pack)
    open_load = np.zeros((rows, num_packs), np.float32)  # load, or +inf once the pack is full
    open_flat = open_load.reshape(-1)  # a view: writes through
    fill = np.zeros(rows * num_packs, np.int64)  # items per (row, pack)
    pack_sorted = np.empty((items, rows), np.int64)
    rank_sorted = np.empty((items, rows), np.int64)
    for j in range(items):
        pack = open_load.argmin(1)  # [rows] first index among the lightest non-full packs
        flat = base + pack
        pack_sorted[j] = pack
        rank = fill[flat]
        rank_sorted[j] = rank
        new_load = load[flat] + sorted_w[j]  # float32, in the greedy order
        load[flat] = new_load
        fill[flat] = rank + 1
        open_flat[flat] = np.where(rank + 1 < per_pack, new_load, np.float32(np.inf))
    pack_sorted, rank_sorted = pack_sorted.T, rank_sorted.T
    pack_index = np.empty_like(pack_sorted)
    rank_in_pack = np.empty_like(rank_sorted)
    np.put_along_axis(pack_index, order, pack_sorted, axis=1)
    np.put_along_axis(rank_in_pack, order, rank_sorted, axis=1)
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add replicas one at a time to the expert with the largest load per replica.

    weight: [rows, num_log] float32 -> phy2log [rows, num_phy], rank [rows, num_phy] (replica index of each
    slot), logcnt [rows, num_log]. Slots 0..num_log-1 hold experts 0..num_log-1.
    """
    rows, num_log = weight.shape
    row = np.arange(rows)
    phy2log = np.empty((rows, num_phy), np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    rank = np.zeros((rows, num_phy), np.int64)
    logcnt = np.ones((rows, num_log), np.int64)
    per_replica = weight.copy()  # [rows, num_log] float32 load per replica
    for i in range(num_log, num_phy):
        hot = per_replica.argmax(1)  # [rows] first index of the maximum
        phy2log[:, i] = hot
        rank[:, i] = logcnt[row, hot]
        logcnt[row, hot] += 1
        per_replica[row, hot] = weight[row, hot] / logcnt[row, hot].astype(np.float32)
    return phy2log, rank, logcnt


def _hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight: [L, E] float32 -> (phy2log [L, R], phyrank [L, R], logcnt [L, E])."""
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    log_per_node = num_log // num_nodes

    # Step 1: pack groups onto nodes; "mlog" numbers experts node-major (node, group-in-node, expert-in-group).
    tokens_per_group = weight.reshape(layers, num_groups, group_size).sum(-1, dtype=np.float32)  # [L, G]
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)  # [L, G]
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(layers, num_log)  # [L, E]
    mlog2log = _inverse(log2mlog)  # [L, E]

    # Step 2: replicate experts within each node: rows are (layer, node).
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=1).reshape(layers * num_nodes, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_phy // num_nodes)  # [L*N, R/N]

    # Step 3: pack each node's replicas onto its GPUs.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    gpu_pack, gpu_rank = balanced_packing(tokens_per_phy, num_gpus // num_nodes)  # [L*N, R/N]
    pphy2phy = _inverse(gpu_pack * phy_per_gpu + gpu_rank)  # slot on the node -> replica index

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(layers, num_phy)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)  # [L, R]
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(layers, num_phy)  # [L, R]
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, num_log), log2mlog, axis=1)  # [L, E]
    return phy2log, pphyrank, logcnt


def rebalance_experts_tuple(weight: Any, num_replicas: int, num_groups: int, num_nodes: int,
                            num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The original's signature and return value: (phy2log [L, R], log2phy [L, E, maxcnt], logcnt [L, E]).

    log2phy[l, e, r] is the slot of replica r of expert e (replicas in creation order), -1 padded to the
    largest logcnt over all layers.
    """
    w = check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    layers, num_log = w.shape
    if policy(num_groups, num_nodes) == "global":
        num_groups, num_nodes = 1, 1
    phy2log, phyrank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    maxcnt = int(logcnt.max())
    log2phy = np.full((layers, num_log * maxcnt), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * maxcnt + phyrank, np.broadcast_to(np.arange(num_replicas), phy2log.shape),
                      axis=1)
    return phy2log, log2phy.reshape(layers, num_log, maxcnt), logcnt


def rebalance_experts(weight: Any, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> ExpertPlacement:
    """weight: [layers, experts] load per logical expert -> a validated ExpertPlacement with num_replicas slots.

    GPU g holds slots [g*R/P, (g+1)*R/P); the policy is hierarchical when num_groups % num_nodes == 0.
    """
    return ExpertPlacement.from_tuple(rebalance_experts_tuple(weight, num_replicas, num_groups, num_nodes, num_gpus))
