"""route_to_replicas: logical top-k ids -> physical slots, deterministic by token index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.ir.placement import ExpertPlacement
from seekax.ops.replica_routing import route_to_replicas, route_to_replicas_np


def _random_placement(rng, experts=16, replicas=24) -> ExpertPlacement:
    extra = rng.integers(0, experts, replicas - experts)
    return ExpertPlacement.from_phy2log(rng.permutation(np.concatenate([np.arange(experts), extra]))[None], experts)


def test_matches_loop_oracle_with_padding_and_offset(rng):
    p = _random_placement(rng)
    topk = rng.integers(0, 16, (37, 4))
    topk[rng.random(topk.shape) < 0.2] = -1
    fn = jax.jit(route_to_replicas)
    for offset in (0, 5):
        got = np.asarray(fn(topk.astype(np.int32), p.log2phy[0], p.logcnt[0], token_offset=offset))
        want = route_to_replicas_np(topk, p.log2phy[0], p.logcnt[0], token_offset=offset)
        assert np.array_equal(got, want)
        assert np.all(got[topk < 0] == -1)
        ok = topk >= 0
        assert np.array_equal(p.phy2log[0][got[ok]], topk[ok])  # each slot holds the routed expert


def test_spreads_evenly_over_replicas(rng):
    p = _random_placement(rng)
    hot = int(np.argmax(p.logcnt[0]))
    n = int(p.logcnt[0, hot])
    topk = jnp.full((n * 10, 1), hot, jnp.int32)
    got = np.asarray(route_to_replicas(topk, p.log2phy[0], p.logcnt[0]))
    counts = np.bincount(got.ravel(), minlength=p.num_replicas)
    assert sorted(np.flatnonzero(counts)) == sorted(p.log2phy[0, hot, :n]) and set(counts[counts > 0]) == {10}


def test_bad_input_names_argument():
    p = ExpertPlacement.identity(1, 4)
    with pytest.raises(ValueError, match="topk_idx"):
        route_to_replicas(jnp.zeros((4,), jnp.int32), p.log2phy[0], p.logcnt[0])
    with pytest.raises(ValueError, match="logcnt"):
        route_to_replicas(jnp.zeros((4, 2), jnp.int32), p.log2phy[0], p.logcnt[0, :3])
    with pytest.raises(ValueError, match="log2phy"):
        route_to_replicas(jnp.zeros((4, 2), jnp.int32), p.log2phy, p.logcnt[0])


@pytest.mark.parametrize("bad", [4, 100, -2])
def test_concrete_ids_out_of_range_are_an_error_not_clamped(bad):
    """An id >= experts used to be clamped by the gather (routed to the last expert's replica), and -2 read as
    "no expert": concrete ids are checked on the host, like ep_dispatch's."""
    p = ExpertPlacement.identity(1, 4, 8)
    topk = np.array([[0, 1], [2, bad]], np.int64)
    with pytest.raises(ValueError, match=rf"^topk_idx={bad}: expected values in \[-1, 4\)"):
        route_to_replicas(topk, p.log2phy[0], p.logcnt[0])
    ok = np.array([[0, 1], [2, 3]], np.uint8)  # unsigned ids pass the check
    np.testing.assert_array_equal(np.asarray(route_to_replicas(ok, p.log2phy[0], p.logcnt[0])),
                                  route_to_replicas_np(ok, p.log2phy[0], p.logcnt[0]))
