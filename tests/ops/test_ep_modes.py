"""ep_dispatch's cached, by-rank and per-rank-count modes and ep_combine's combined weights at the API: clear
errors for bad input (at trace time, or together on every rank at run time), the ragged transport lowering
for CUDA at a DeepSeek-V3 shape, and GPU runs that must equal the padded transport."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.ops import ep
from seekax.testing.kernels import cross_lower


def _run(mesh, fn, *arrays):
    args = [jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in arrays]
    body = lambda *xs: jax.tree.map(lambda o: o[None], fn(*xs))  # noqa: E731
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("ep") for _ in args), out_specs=P("ep")))(*args)
    return jax.tree.map(np.asarray, jax.block_until_ready(out))


def test_cached_dispatch_errors():
    x, idx = jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((4, 2), jnp.int32)
    d = ep.ep_dispatch(x, idx, num_experts=8, axis_name=None, capacity=4)
    with pytest.raises(ValueError, match="^topk_idx=.*handle"):
        ep.ep_dispatch(x, idx, axis_name=None, handle=d.handle)
    with pytest.raises(ValueError, match="^num_tokens=.*handle"):
        ep.ep_dispatch(x, axis_name=None, handle=d.handle, num_tokens=2)
    with pytest.raises(ValueError, match="^transport='low_latency'"):
        ep.ep_dispatch(x, axis_name=None, handle=d.handle, transport="low_latency")
    with pytest.raises(ValueError, match="^capacity=3"):
        ep.ep_dispatch(x, axis_name=None, handle=d.handle, capacity=3)
    with pytest.raises(ValueError, match="^num_experts=16"):
        ep.ep_dispatch(x, axis_name=None, handle=d.handle, num_experts=16)
    with pytest.raises(ValueError, match=r"^x.shape=\(5, 128\).*handle"):
        ep.ep_dispatch(jnp.zeros((5, 128)), axis_name=None, handle=d.handle)
    with pytest.raises(ValueError, match="^axis_name='ep'"):
        ep.ep_dispatch(x, axis_name="ep", handle=d.handle)
    with pytest.raises(ValueError, match=r"^x.shape=.*multiple of 128"):
        ep.ep_dispatch(jnp.zeros((4, 64)), axis_name=None, handle=d.handle, fp8=True)
    # Matching arguments are accepted, so one set of keyword arguments serves both calls.
    same = ep.ep_dispatch(x, axis_name=None, handle=d.handle, transport="padded", capacity=4, num_experts=8)
    np.testing.assert_array_equal(np.asarray(same.x, np.float32), np.asarray(d.x, np.float32))


def test_rank_mode_and_token_count_errors():
    x, idx = jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((4, 2), jnp.int32)
    dest = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="^topk_idx=None: expected exactly one"):
        ep.ep_dispatch(x, axis_name=None)
    with pytest.raises(ValueError, match=r"^topk_idx=\['topk_idx', 'dest_rank'\]"):
        ep.ep_dispatch(x, idx, num_experts=8, axis_name=None, dest_rank=dest)
    with pytest.raises(ValueError, match="^dest_rank="):
        ep.ep_dispatch(x, axis_name=None, dest_rank=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="^dest_rank=1: expected values in"):            # one rank: only 0
        ep.ep_dispatch(x, axis_name=None, dest_rank=dest.at[2].set(1))
    with pytest.raises(ValueError, match="^is_token_in_rank="):
        ep.ep_dispatch(x, axis_name=None, is_token_in_rank=jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match="^topk_weights=.*rank mode"):
        ep.ep_dispatch(x, None, jnp.zeros((4, 2)), axis_name=None, dest_rank=dest)
    with pytest.raises(ValueError, match="^transport='low_latency'"):
        ep.ep_dispatch(x, axis_name=None, dest_rank=dest, transport="low_latency")
    for bad, match in ((5, "^num_tokens=5: expected a token count in"), (-1, "^num_tokens=-1"),
                       (jnp.zeros((2,), jnp.int32), r"^num_tokens=\(2,\)"), (jnp.float32(2), r"^num_tokens=\(\)")):
        with pytest.raises(ValueError, match=match):
            ep.ep_dispatch(x, idx, num_experts=8, axis_name=None, num_tokens=bad)
    # Concrete ids are checked only below a concrete count: garbage in padding rows is fine.
    d = ep.ep_dispatch(x, idx.at[3, 0].set(99), num_experts=8, axis_name=None, num_tokens=jnp.array([3]))
    assert int(d.num_recv) == 3
    with pytest.raises(ValueError, match="^topk_idx=99"):
        ep.ep_dispatch(x, idx.at[2, 0].set(99), num_experts=8, axis_name=None, num_tokens=3)


def test_combine_weights_errors():
    x, idx = jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((4, 2), jnp.int32)
    d = ep.ep_dispatch(x, idx, num_experts=8, axis_name=None)
    with pytest.raises(ValueError, match="^topk_weights=.*return_weights=True"):
        ep.ep_combine(d.x, d.handle, topk_weights=d.topk_weights)
    with pytest.raises(ValueError, match=r"^topk_weights.shape=\(3, 2\)"):
        ep.ep_combine(d.x, d.handle, return_weights=True, topk_weights=d.topk_weights[:3])
    assert isinstance(ep.ep_combine(d.x, d.handle), jax.Array)                    # existing callers unchanged
    r = ep.ep_dispatch(x, axis_name=None, dest_rank=jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="^topk_weights=None: expected .*without top-k"):
        ep.ep_combine(r.x, r.handle, return_weights=True)
    with pytest.raises(ValueError, match="^weighted=True"):
        ep.ep_combine(r.x, r.handle, weighted=True)
    distinct = jnp.tile(jnp.arange(2, dtype=jnp.int32), (4, 1))  # idx repeats expert 0: low latency overflows
    ll = ep.ep_dispatch(x, distinct, num_experts=8, axis_name=None, transport="low_latency")
    with pytest.raises(ValueError, match="^topk_weights.shape="):
        ep.ep_combine(ll.x, ll.handle, return_weights=True, topk_weights=jnp.zeros((4, 2)))


def test_traced_token_counts_and_ranks_out_of_range_raise_on_every_rank():
    mesh = jax.make_mesh((4,), ("ep",))
    x, idx = np.zeros((16, 8), np.float32), np.zeros((16, 2), np.int32)
    counts = np.array([4, 4, 5, 0], np.int32)                                      # rank 2: 5 > T = 4
    with pytest.raises(Exception, match=r"num_tokens=5: expected a token count in \[0, 4\]"):
        _run(mesh, lambda x, i, n: ep.ep_dispatch(x, i, num_experts=8, axis_name="ep", num_tokens=n).x,
             x, idx, counts)
    dest = np.zeros(16, np.int32)
    dest[6] = 4
    with pytest.raises(Exception, match=r"dest_rank=4: expected values in \[-1, 4\)"):
        _run(mesh, lambda x, r: ep.ep_dispatch(x, axis_name="ep", dest_rank=r).x, x, dest)
    dest[6] = 0
    dest[7] = 9                                                                    # past rank 1's count of 3
    out = _run(mesh, lambda x, r, n: ep.ep_dispatch(x, axis_name="ep", dest_rank=r, num_tokens=n).num_recv,
               x, dest, np.array([4, 3, 4, 4], np.int32))
    assert out.tolist() == [15, 0, 0, 0]


def _v3_body(x, idx, w, n, dest):
    """Every new path on the ragged transport: a dispatch with a per-rank token count, a cached FP8 dispatch
    of its handle, a combine returning weights, a dispatch by rank and its combine."""
    d = ep.ep_dispatch(x, idx, w, num_experts=256, axis_name="ep", transport="ragged", num_tokens=n[0],
                       check_ids=False)                                       # x + ids/weights: 2
    c = ep.ep_dispatch(x, axis_name="ep", handle=d.handle, fp8=True)          # x_fp8 + scales: 2
    comb = ep.ep_combine(d.x, d.handle, return_weights=True)                  # rows + weights: 2
    r = ep.ep_dispatch(x, axis_name="ep", dest_rank=dest, transport="ragged", check_ids=False)   # 1
    back = ep.ep_combine(r.x, r.handle)                                       # 1
    return comb.x + back, comb.topk_weights, c.x, c.x_scale


def test_new_paths_lower_for_cuda_at_deepseek_v3_shape():
    """DeepSeek-V3 on EP 8 (H 7168, 256 experts, top-8, 4096 tokens a rank): ragged_all_to_all only, and a
    count exchange (all_gather) only for the two fresh routes, none for the cached dispatch."""
    mesh = jax.make_mesh((8,), ("ep",))
    t, h, k = 4096, 7168, 8
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P("ep")))  # noqa: E731
    f = jax.shard_map(_v3_body, mesh=mesh, in_specs=(P("ep"),) * 5, out_specs=P("ep"))
    lowered = cross_lower(f, sds((8 * t, h), jnp.bfloat16), sds((8 * t, k), jnp.int32), sds((8 * t, k), jnp.float32),
                          sds((8,), jnp.int32), sds((8 * t,), jnp.int32))
    hlo = lowered.emit("stablehlo")
    assert hlo.count("@ragged_all_to_all") == 8
    assert "all_to_all" not in hlo.replace("ragged_all_to_all", "")
    assert hlo.count("stablehlo.all_gather") == 2


def test_cached_dispatch_grad_lowers_for_cuda_at_deepseek_v3_shape():
    """jax.grad through a cached dispatch and its combine: the backward reuses the route (2 ragged moves for
    the cached payload, forward and back, plus the fresh dispatch's 2 forward ones), one count exchange."""
    mesh = jax.make_mesh((8,), ("ep",))
    t, h, k = 4096, 7168, 8

    def loss(x, x2, idx):
        def body(x, x2, idx):
            d = ep.ep_dispatch(x, idx, num_experts=256, axis_name="ep", transport="ragged", check_ids=False)
            c = ep.ep_dispatch(x2, axis_name="ep", handle=d.handle)
            return (ep.ep_combine(c.x, c.handle).astype(jnp.float32) ** 2).sum()[None]
        return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))(x, x2, idx).sum()

    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P("ep")))  # noqa: E731
    lowered = cross_lower(jax.grad(loss, argnums=1), sds((8 * t, h), jnp.bfloat16), sds((8 * t, h), jnp.bfloat16),
                          sds((8 * t, k), jnp.int32))
    hlo = lowered.emit("stablehlo")
    assert hlo.count("@ragged_all_to_all") == 4
    assert "all_to_all" not in hlo.replace("ragged_all_to_all", "")
    assert hlo.count("stablehlo.all_gather") == 1


def _gpu_case(item, rng, p):
    t, h, k, e = 64, 256, 4, 8 * p
    idx = np.where(rng.random((p * t, k)) < 0.2, -1,
                   np.stack([rng.choice(e, k, replace=False) for _ in range(p * t)])).astype(np.int32)
    x = rng.standard_normal((p * t, h)).astype(jnp.bfloat16)
    w = rng.random((p * t, k)).astype(np.float32)
    counts = rng.integers(0, t + 1, p).astype(np.int32)
    dest = rng.integers(-1, p, p * t).astype(np.int32)

    def fn(transport):
        def body(x, idx, w, n, dest):
            if item == "cached":
                d = ep.ep_dispatch(x, idx, w, num_experts=e, axis_name="ep", transport=transport)
                c = ep.ep_dispatch(x * 2, axis_name="ep", handle=d.handle)
                return c.x, c.num_recv[None], ep.ep_combine(c.x, c.handle)
            if item == "no_topk":
                d = ep.ep_dispatch(x, axis_name="ep", dest_rank=dest, transport=transport)
                return d.x, d.num_recv[None], ep.ep_combine(d.x, d.handle)
            if item == "combined_weights":
                d = ep.ep_dispatch(x, idx, w, num_experts=e, axis_name="ep", transport=transport)
                c = ep.ep_combine(d.x, d.handle, return_weights=True)
                return d.x, c.topk_weights, c.x
            d = ep.ep_dispatch(x, idx, w, num_experts=e, axis_name="ep", transport=transport, num_tokens=n)
            return d.x, d.topk_idx, ep.ep_combine(d.x, d.handle)
        return body

    return fn, (x, idx, w, counts, dest)


@pytest.mark.gpu
@pytest.mark.parametrize("item", ["cached", "no_topk", "combined_weights", "num_tokens"])
def test_new_paths_on_gpu_equal_padded(rng, item):
    """On the GPUs present (any count): each new path on the ragged transport gives the padded results."""
    p = len(jax.devices())
    mesh = jax.make_mesh((p,), ("ep",))
    fn, args = _gpu_case(item, rng, p)
    got = _run(mesh, fn("ragged"), *args)
    want = _run(mesh, fn("padded"), *args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
