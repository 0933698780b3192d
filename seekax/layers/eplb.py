"""EPLB applied at run time: count tokens per expert over a window, rebalance, move the fewest expert weights.

  window = LoadWindow.create(64, layers, experts); window = window.add(counts)   # each step (jit-able)
  placement, plan = rebalance(window, placement, num_groups=8, num_nodes=4, num_gpus=32)
  weights = migrate_expert_weights(weights, plan.src_slot, mesh)   # [layers, slots, ...], all_to_all over "ep"

`rebalance` runs EPLB on the window's load, then relabels the result without changing any GPU's load:
GPUs (within a node for the hierarchical policy, whole nodes, or any GPU for the global policy) are matched
to the current GPUs that already hold most of their experts, and inside a GPU every expert already there
keeps its slot. Each new slot is then filled from the nearest current replica (same GPU, same node, any).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment

from seekax.ir.placement import ExpertPlacement
from seekax.ir.validate import check_int, fail
from seekax.schedules.eplb import check_rebalance_args, policy, rebalance_experts


# ---- load window -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadWindow:
    """A ring buffer of per-step token counts per logical expert: a pytree, so `add` can run under jit.

    counts: [window, layers, experts] int32; step: [] int32 steps recorded so far (the ring slot is step % window).
    """

    counts: jax.Array
    step: jax.Array

    @classmethod
    def create(cls, window: int, num_layers: int, num_experts: int) -> LoadWindow:
        window = check_int("window", window, min_value=1)
        num_layers = check_int("num_layers", num_layers, min_value=1)
        num_experts = check_int("num_experts", num_experts, min_value=1)
        return cls(counts=jnp.zeros((window, num_layers, num_experts), jnp.int32), step=jnp.zeros((), jnp.int32))

    @property
    def window(self) -> int:
        return int(self.counts.shape[0])

    def add(self, counts: jax.Array) -> LoadWindow:
        """counts: [layers, experts] tokens routed to each logical expert this step -> the updated window."""
        counts = jnp.asarray(counts)
        if tuple(counts.shape) != tuple(self.counts.shape[1:]):
            raise fail("counts.shape", tuple(counts.shape), f"{tuple(self.counts.shape[1:])} (layers, experts)")
        if not jnp.issubdtype(counts.dtype, jnp.integer):  # the int32 ring would truncate fractions silently
            raise fail("counts.dtype", str(counts.dtype), "an integer dtype (token counts, e.g. moe_layer's "
                       "aux['tokens_per_expert']; pass float loads to rebalance directly)")
        ring = self.counts.at[self.step % self.window].set(counts.astype(jnp.int32))
        return LoadWindow(counts=ring, step=self.step + 1)

    def load(self) -> jax.Array:
        """[layers, experts] tokens per expert summed over the last `window` steps."""
        return self.counts.sum(0)


jax.tree_util.register_dataclass(LoadWindow, data_fields=["counts", "step"], meta_fields=[])


def logical_counts(slot_counts: jax.Array, phy2log: jax.Array, num_experts: int) -> jax.Array:
    """slot_counts: [layers, replicas] tokens per physical slot -> [layers, experts] per logical expert. jit-able."""
    slot_counts, phy2log = jnp.asarray(slot_counts), jnp.asarray(phy2log)
    if slot_counts.shape != phy2log.shape:
        raise fail("slot_counts.shape", tuple(slot_counts.shape), f"{tuple(phy2log.shape)} like phy2log")
    rows = jnp.arange(phy2log.shape[0])[:, None]
    return jnp.zeros((phy2log.shape[0], num_experts), slot_counts.dtype).at[rows, phy2log].add(slot_counts)


# ---- rebalance with a migration plan -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class MigrationPlan:
    """Where each new physical slot gets its weights: src_slot[l, s] is a slot of the *current* placement
    holding the same logical expert (src_slot[l, s] == s: the slot keeps its weights).

    src_slot: [layers, replicas] int64; num_gpus: GPUs the slots are spread over (GPU g: slots g*R/P ...).
    """

    src_slot: np.ndarray
    num_gpus: int

    def __post_init__(self) -> None:
        src = np.asarray(self.src_slot, np.int64)
        if src.ndim != 2 or src.min() < 0 or src.max() >= src.shape[1]:
            raise fail("src_slot", src.shape, "[layers, replicas] slot ids in [0, replicas)")
        check_int("num_gpus", self.num_gpus, min_value=1)
        if src.shape[1] % self.num_gpus:
            raise fail("num_gpus", self.num_gpus, f"a divisor of replicas={src.shape[1]}")
        src.flags.writeable = False
        object.__setattr__(self, "src_slot", src)

    @property
    def moved(self) -> np.ndarray:
        """[layers, replicas] True where the slot receives new weights."""
        return self.src_slot != np.arange(self.src_slot.shape[1])

    @property
    def num_moves(self) -> int:
        """Expert weight copies (local or remote) the migration performs."""
        return int(self.moved.sum())

    @property
    def num_remote(self) -> int:
        """Copies whose source is on another GPU (these cross the interconnect)."""
        per_gpu = self.src_slot.shape[1] // self.num_gpus
        dst_gpu = np.arange(self.src_slot.shape[1]) // per_gpu
        return int((self.src_slot // per_gpu != dst_gpu).sum())

    @classmethod
    def identity(cls, num_layers: int, num_replicas: int, num_gpus: int) -> MigrationPlan:
        return cls(src_slot=np.tile(np.arange(num_replicas), (num_layers, 1)), num_gpus=num_gpus)


def _overlap(cur: np.ndarray, tgt: np.ndarray, num_gpus: int) -> np.ndarray:
    """cur, tgt phy2log [R] -> [P, P] experts that current GPU g and target GPU t have in common (multisets).

    min(x, y) copies of an expert match: the i-th copy on g pairs with the i-th copy on t. Joining on
    (expert, copy index) touches only the few slot pairs that share an expert (no BLAS, no [P, P, E] tensor).
    """
    replicas = cur.size
    gpu = np.arange(replicas) // (replicas // num_gpus)
    key_cur = cur * replicas + _occurrence(gpu * replicas + cur)  # [R] (expert, copy index on its GPU)
    key_tgt = tgt * replicas + _occurrence(gpu * replicas + tgt)  # [R]
    order = np.argsort(key_cur, kind="stable")
    sorted_cur = key_cur[order]
    lo = np.searchsorted(sorted_cur, key_tgt, "left")
    count = np.searchsorted(sorted_cur, key_tgt, "right") - lo  # [R] current slots matching each target slot
    pair_tgt = np.repeat(np.arange(replicas), count)
    pair_cur = order[np.repeat(lo, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)]
    return np.bincount(gpu[pair_cur] * num_gpus + gpu[pair_tgt], minlength=num_gpus * num_gpus).reshape(
        num_gpus, num_gpus)


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """[n] keys -> [n] how many earlier entries have the same key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    start = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    first = np.repeat(start, np.diff(np.r_[start, keys.size]))
    occ = np.empty_like(keys)
    occ[order] = np.arange(keys.size) - first
    return occ


def _match_gpus(cur_phy2log: np.ndarray, tgt_phy2log: np.ndarray, num_experts: int, num_gpus: int,
                num_nodes: int) -> np.ndarray:
    """One layer -> gpu_of_pack [P]: the current GPU that takes target GPU t's slots, maximising kept experts.

    num_nodes > 1 restricts the matching to whole-node and within-node permutations (hierarchical policy).
    """
    score = _overlap(cur_phy2log, tgt_phy2log, num_gpus)  # [cur GPU, target GPU]
    gpus_per_node = num_gpus // num_nodes
    blocks = score.reshape(num_nodes, gpus_per_node, num_nodes, gpus_per_node)
    inner = {}  # (current node, target node) -> (value, within-node assignment)
    node_score = np.zeros((num_nodes, num_nodes))
    for a in range(num_nodes):
        for b in range(num_nodes):
            rows, cols = linear_sum_assignment(blocks[a, :, b, :], maximize=True)
            inner[a, b] = cols
            node_score[a, b] = blocks[a, rows, b, cols].sum()
    node_rows, node_cols = linear_sum_assignment(node_score, maximize=True)
    gpu_of_pack = np.empty(num_gpus, np.int64)
    for a, b in zip(node_rows, node_cols):
        for i, j in enumerate(inner[a, b]):  # current GPU a*g+i takes target GPU b*g+j
            gpu_of_pack[b * gpus_per_node + j] = a * gpus_per_node + i
    return gpu_of_pack


def _place_layer(cur: np.ndarray, tgt: np.ndarray, num_experts: int, num_gpus: int,
                 num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer: cur, tgt phy2log [R] -> (new phy2log [R] with tgt's per-GPU multisets, src_slot [R])."""
    replicas = cur.size
    per_gpu = replicas // num_gpus
    gpus_per_node = num_gpus // num_nodes
    gpu_of_pack = _match_gpus(cur, tgt, num_experts, num_gpus, num_nodes)  # [P]
    slot_gpu = np.arange(replicas) // per_gpu  # [R]
    # Target slots relabelled onto the GPUs that take them; experts counted per (GPU, expert).
    tgt_gpu = gpu_of_pack[slot_gpu]  # [R] GPU that receives target slot u
    want = np.zeros((num_gpus, num_experts), np.int64)
    np.add.at(want, (tgt_gpu, tgt), 1)
    # An expert already on its GPU keeps its slot (up to the number of copies the GPU needs).
    cur_occ = _occurrence(slot_gpu * num_experts + cur)  # [R]
    kept = cur_occ < want[slot_gpu, cur]  # [R]
    have = np.zeros((num_gpus, num_experts), np.int64)
    np.add.at(have, (slot_gpu[kept], cur[kept]), 1)
    tgt_occ = _occurrence(tgt_gpu * num_experts + tgt)  # [R]
    missing = tgt_occ >= have[tgt_gpu, tgt]  # target slots not covered by a kept slot
    # Free slots (ascending) take the missing experts (in target order), GPU by GPU.
    free = np.flatnonzero(~kept)
    fill = np.flatnonzero(missing)
    fill = fill[np.argsort(tgt_gpu[fill], kind="stable")]
    new = cur.copy()
    new[free] = tgt[fill]
    # Sources: a replica on the same GPU, else the same node, else anywhere; remote sends spread evenly.
    src = np.arange(replicas)
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(cur.tolist()):
        holders.setdefault(expert, []).append(slot)
    sends = [0] * replicas
    for s, e in zip(free.tolist(), new[free].tolist()):
        gpu = s // per_gpu
        node = gpu // gpus_per_node

        def cost(q: int) -> tuple[int, int, int]:
            q_gpu = q // per_gpu
            return (q_gpu != gpu) + (q_gpu // gpus_per_node != node), sends[q], q

        best = min(holders[e], key=cost)
        src[s] = best
        sends[best] += best // per_gpu != gpu
    return new, src


def rebalance(load: Any, current: ExpertPlacement, *, num_groups: int, num_nodes: int, num_gpus: int,
              num_replicas: int | None = None) -> tuple[ExpertPlacement, MigrationPlan]:
    """EPLB on `load` (a LoadWindow or [layers, experts] counts), relabelled to move the fewest weights.

    Returns the new placement (per-GPU loads identical to `rebalance_experts`' output) and the plan that
    turns the current slots' weights into the new ones. num_replicas defaults to the current placement's.
    """
    if isinstance(load, LoadWindow):
        load = np.asarray(load.load())
    if not isinstance(current, ExpertPlacement):
        raise fail("current", type(current).__name__, "an ExpertPlacement")
    num_replicas = current.num_replicas if num_replicas is None else num_replicas
    if num_replicas != current.num_replicas:
        raise fail("num_replicas", num_replicas, f"the current placement's {current.num_replicas} slots")
    weight = check_rebalance_args(load, num_replicas, num_groups, num_nodes, num_gpus)
    if weight.shape != current.logcnt.shape:
        raise fail("load.shape", weight.shape, f"{current.logcnt.shape} like the current placement's logcnt")
    target = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    match_nodes = num_nodes if policy(num_groups, num_nodes) == "hierarchical" else 1
    layers = [_place_layer(c, t, current.num_logical, num_gpus, match_nodes)
              for c, t in zip(current.phy2log, target.phy2log)]
    new = ExpertPlacement.from_phy2log(np.stack([n for n, _ in layers]), current.num_logical)
    return new, MigrationPlan(src_slot=np.stack([s for _, s in layers]), num_gpus=num_gpus)


# ---- migration under shard_map -----------------------------------------------------------------------------
def migration_capacity(src_slot: Any, num_devices: int) -> int:
    """Rows the busiest (source device, destination device) pair carries in one layer (>= 1).

    src_slot: [replicas] or [layers, replicas]. Passing a fixed capacity to migrate_expert_weights keeps one
    compiled program across layers and rebalances.
    """
    src = np.atleast_2d(np.asarray(src_slot, np.int64))
    per_dev = src.shape[1] // num_devices
    dst_dev = np.arange(src.shape[1]) // per_dev
    best = 1
    for row in src:
        remote = row // per_dev != dst_dev
        pairs = np.unique(np.stack([row[remote], dst_dev[remote]]), axis=1)  # distinct (slot, destination)
        if pairs.size:
            best = max(best, int(np.unique(pairs[0] // per_dev * num_devices + pairs[1], return_counts=True)[1].max()))
    return best


def _migration_tables(src: np.ndarray, num_devices: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """src [L, R] -> send [L, D, D, m] local slot each device sends to each device, gather [L, D, S].

    Device d's new slot j is concat(local slots [S], received [D * m])[gather[l, d, j]]; received row
    c * m + i is send[l, c, d, i] of device c. A slot needed twice on one device is sent once.
    """
    layers, replicas = src.shape
    per_dev = replicas // num_devices
    send = np.zeros((layers, num_devices, num_devices, capacity), np.int32)
    gather = np.empty((layers, num_devices, per_dev), np.int32)
    for layer in range(layers):
        fill = np.zeros((num_devices, num_devices), np.int64)
        where: dict[tuple[int, int], int] = {}
        for s, q in enumerate(src[layer].tolist()):
            d, c = s // per_dev, q // per_dev
            if c == d:
                gather[layer, d, s % per_dev] = q % per_dev
                continue
            if (q, d) not in where:
                if fill[c, d] >= capacity:
                    raise fail("capacity", capacity, f">= {migration_capacity(src, num_devices)} rows per device pair")
                where[q, d] = int(fill[c, d])
                send[layer, c, d, fill[c, d]] = q % per_dev
                fill[c, d] += 1
            gather[layer, d, s % per_dev] = per_dev + c * capacity + where[q, d]
    return send, gather


def _migration_program(mesh: jax.sharding.Mesh, axis_name: str, num_leaves: int):
    """jit(shard_map) moving [L, R, ...] leaves with runtime tables: one all_to_all per leaf."""

    def body(send, gather, *leaves):  # send [L, 1, D, m], gather [L, 1, S], leaves [L, S, ...] on one device
        send, gather = send[:, 0], gather[:, 0]
        out = []
        for x in leaves:
            rows = jax.vmap(lambda xl, il: xl[il])(x, send)  # [L, D, m, ...] rows for each destination
            recv = jax.lax.all_to_all(rows, axis_name, split_axis=1, concat_axis=1)  # [L, D (source), m, ...]
            pool = jnp.concatenate([x, recv.reshape(x.shape[0], -1, *x.shape[2:])], axis=1)  # [L, S + D*m, ...]
            out.append(jax.vmap(lambda pl, gl: pl[gl])(pool, gather))  # [L, S, ...]
        return tuple(out)

    spec = P(None, axis_name)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec) + (spec,) * num_leaves,
                                 out_specs=(spec,) * num_leaves))


_PROGRAMS: dict[tuple[Any, str, int], Any] = {}


def migrate_expert_weights(weights: Any, src_slot: Any, mesh: jax.sharding.Mesh, *, axis_name: str = "ep",
                           capacity: int | None = None) -> Any:
    """Move expert weights to their new slots with one all_to_all over the EP axis (per pytree leaf).

    weights: a pytree of arrays [replicas, ...] (src_slot [replicas], one layer) or [layers, replicas, ...]
    (src_slot [layers, replicas], e.g. MigrationPlan.src_slot), the slot axis sharded over `axis_name`
    (device d holds slots [d*S, (d+1)*S)). Returns the pytree with new[s] = old[src_slot[s]] (per layer),
    sharded the same way. Slots whose source is on the same device never leave it; the exchange is padded
    to `capacity` rows per device pair (default: the busiest pair's need). The tables are runtime inputs,
    so one compiled program serves every layer and every rebalance with the same shapes and capacity.
    """
    src = np.asarray(src_slot)
    if axis_name not in mesh.shape:
        raise fail("axis_name", axis_name, f"an axis of the mesh {dict(mesh.shape)}")
    num_devices = mesh.shape[axis_name]
    if src.ndim not in (1, 2) or not np.issubdtype(src.dtype, np.integer) or src.size == 0:
        raise fail("src_slot", src.shape, "[replicas] or [layers, replicas] integer slot ids")
    layered = src.ndim == 2
    src = np.atleast_2d(src).astype(np.int64)
    layers, replicas = src.shape
    if replicas % num_devices or src.min() < 0 or src.max() >= replicas:
        raise fail("src_slot", src.shape, f"slot ids in [0, replicas), replicas a multiple of {num_devices} devices")
    leaves, treedef = jax.tree.flatten(weights)
    want = (layers, replicas) if layered else (replicas,)
    for i, leaf in enumerate(leaves):
        if tuple(np.shape(leaf)[:len(want)]) != want:  # np.shape: a Python scalar leaf has shape ()
            raise fail(f"weights[{i}].shape", tuple(np.shape(leaf)), f"{want} + (...) one row per slot")
    if np.array_equal(src, np.broadcast_to(np.arange(replicas), src.shape)):
        return weights
    need = migration_capacity(src, num_devices)
    capacity = need if capacity is None else check_int("capacity", capacity, min_value=1)
    send, gather = _migration_tables(src, num_devices, capacity)
    key = (mesh, axis_name, len(leaves))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _migration_program(mesh, axis_name, len(leaves))
    spec = NamedSharding(mesh, P(None, axis_name))
    put = lambda a: jax.device_put(a, spec)  # noqa: E731
    # The tables' device axis (1) is sharded, so device d reads send[:, d] and gather[:, d].
    args = [put(jnp.asarray(leaf if layered else leaf[None])) for leaf in leaves]
    out = _PROGRAMS[key](put(send), put(gather), *args)
    out = [o if layered else o[0] for o in out]
    return jax.tree.unflatten(treedef, out)
