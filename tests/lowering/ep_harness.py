"""Shared EP test harness: routings with edge patterns, and running a per-rank function under shard_map on
the CPU host devices with [P, ...] inputs and outputs."""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def routing(rng, p, t, k, e, *, pattern="random", masked=0.2):
    """topk_idx [P, T, K]: distinct experts per token, -1 with probability `masked`."""
    idx = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) for _ in range(p)])
    if pattern == "one_expert":          # every token picks expert 3 and nothing else
        idx = np.full((p, t, k), -1)
        idx[..., 0] = 3 % e
    elif pattern == "empty_ranks":       # only experts of ranks 0 and 1 are ever selected; rank 2 sends nothing
        per = e // p
        idx = np.stack([np.stack([rng.choice(2 * per, k, replace=False) for _ in range(t)]) for _ in range(p)])
        idx[2 % p] = -1
    idx = np.where(rng.random(idx.shape) < masked, -1, idx)
    return idx.astype(np.int32)


def shard(mesh, *arrays):
    """[P, T, ...] arrays -> [P*T, ...] global arrays split over the "ep" axis."""
    return [jax.device_put(a.reshape((-1,) + a.shape[2:]), NamedSharding(mesh, P("ep"))) for a in arrays]


def run_ep(fn, p, *arrays):
    """Run fn per rank under shard_map over ("ep",) with arrays [P, ...] split on the rank axis; every
    output leaf comes back as [P, ...]."""
    mesh = jax.make_mesh((p,), ("ep",))
    args = shard(mesh, *arrays)

    def body(*xs):
        out = fn(*xs)
        return jax.tree.map(lambda o: o[None], out)

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("ep") for _ in args), out_specs=P("ep")))(*args)
    return jax.tree.map(np.asarray, out)
