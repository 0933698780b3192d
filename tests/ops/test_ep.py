"""Public EP API: clear errors for bad input, capacity overflow (raise or count), transport choice,
and the ragged transport lowering for CUDA on this CPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.lowering.reference import dispatch as ref
from seekax.ops import ep
from seekax.testing.kernels import cross_lower


def _run(mesh, fn, *arrays):
    args = [jax.device_put(a, NamedSharding(mesh, P("ep"))) for a in arrays]
    body = lambda *xs: jax.tree.map(lambda o: o[None], fn(*xs))  # noqa: E731
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("ep") for _ in args), out_specs=P("ep")))(*args)
    return jax.tree.map(np.asarray, jax.block_until_ready(out))


def test_layout_validates_and_matches_reference(rng):
    idx = rng.integers(-1, 16, (20, 4)).astype(np.int32)
    got = ep.dispatch_layout(idx, 16, 4)
    for g, w in zip(got, ref.dispatch_layout(idx, 16, 4)):
        np.testing.assert_array_equal(np.asarray(g), w)
    with pytest.raises(ValueError, match="num_experts"):
        ep.dispatch_layout(idx, 16, 3)
    with pytest.raises(ValueError, match="topk_idx"):
        ep.dispatch_layout(idx + 1, 16, 4)


def test_bad_input_clear_errors():
    x, idx = jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="topk_idx"):                         # concrete ids: checked on the host
        ep.ep_dispatch(x, idx.at[1, 1].set(8), num_experts=8, axis_name=None)
    with pytest.raises(ValueError, match="topk_idx"):
        ep.ep_dispatch(x, idx.at[0, 0].set(-2), num_experts=8, axis_name=None)
    with pytest.raises(ValueError, match="transport"):
        ep.ep_dispatch(x, idx, num_experts=8, axis_name=None, transport="nccl")
    with pytest.raises(ValueError, match="capacity"):
        ep.ep_dispatch(x, idx, num_experts=8, axis_name=None, capacity=0)
    with pytest.raises(ValueError, match="topk_weights.shape"):
        ep.ep_dispatch(x, idx, jnp.zeros((4, 3)), num_experts=8, axis_name=None)
    with pytest.raises(ValueError, match="topk_weights.dtype"):
        ep.ep_dispatch(x, idx, jnp.zeros((4, 2), jnp.int32), num_experts=8, axis_name=None)
    with pytest.raises(ValueError, match="x.shape"):
        ep.ep_dispatch(x[:, :100], idx, num_experts=8, axis_name=None, fp8=True)
    d = ep.ep_dispatch(x, idx, num_experts=8, axis_name=None)
    with pytest.raises(ValueError, match="y.shape"):
        ep.ep_combine(x[:3], d.handle)
    mesh = jax.make_mesh((4,), ("ep",))
    with pytest.raises(ValueError, match="num_experts"):                     # 6 experts over 4 ranks
        _run(mesh, lambda x, i: ep.ep_dispatch(x, i, num_experts=6, axis_name="ep").x,
             np.zeros((16, 8), np.float32), np.zeros((16, 2), np.int32))


@pytest.mark.parametrize("axis_name", ["ep", ("ep", "dp")])
def test_an_axis_name_outside_shard_map_is_a_clear_error(axis_name):
    """Eager or under jit, an axis no shard_map binds: a ValueError naming axis_name, not JAX's NameError."""
    x, idx = jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"^axis_name=.*inside shard_map") as eager:
        ep.ep_dispatch(x, idx, num_experts=8, axis_name=axis_name)
    assert not isinstance(eager.value, NameError) and eager.value.__cause__ is None
    with pytest.raises(ValueError, match=r"^axis_name="):
        jax.jit(lambda x: ep.ep_dispatch(x, idx, num_experts=8, axis_name=axis_name).x)(x)
    mesh = jax.make_mesh((4,), ("ep",))                                        # inside shard_map: fine
    out = _run(mesh, lambda x, i: ep.ep_dispatch(x, i, num_experts=8, axis_name="ep").num_recv,
               np.zeros((16, 128), np.float32), np.zeros((16, 2), np.int32))
    assert out.shape == (4,) and ep.ep_axis_size(None) == 1


def test_traced_ids_out_of_range_raise_at_run_time():
    mesh = jax.make_mesh((4,), ("ep",))
    idx = np.zeros((16, 2), np.int32)
    idx[9, 1] = 99
    with pytest.raises(Exception, match="topk_idx=99"):
        _run(mesh, lambda x, i: ep.ep_dispatch(x, i, num_experts=8, axis_name="ep").x,
             np.zeros((16, 8), np.float32), idx)


def test_capacity_overflow_raises_or_counts(rng):
    mesh = jax.make_mesh((4,), ("ep",))
    p, t, e = 4, 6, 8
    idx = np.full((p * t, 2), -1, np.int32)
    idx[:, 0] = 0                              # every token to expert 0 on rank 0: 6 per (source, rank 0) pair
    x = rng.standard_normal((p * t, 8)).astype(np.float32)
    for transport in ("padded", "low_latency", "ragged_emulated"):
        with pytest.raises(Exception, match="capacity=4 overflowed"):
            _run(mesh, lambda x, i: ep.ep_dispatch(x, i, num_experts=e, axis_name="ep", capacity=4,
                                                   transport=transport).x, x, idx)
        out = _run(mesh, lambda x, i: ep.ep_dispatch(x, i, num_experts=e, axis_name="ep", capacity=4, drop=True,
                                                     transport=transport), x, idx)
        np.testing.assert_array_equal(out.num_dropped, [2] * p)               # 6 - 4 per source rank
        kept = out.num_recv[0]
        assert int(np.sum(kept)) == 16 and int(np.sum(out.num_recv[1:])) == 0
        if transport != "low_latency":                                       # the first 4 of each source arrive
            want = x.reshape(p, t, 8)[:, :4].reshape(16, 8)
            np.testing.assert_array_equal(out.x[0][:16], want)


def test_auto_transport_and_ragged_lowers_for_cuda():
    assert ep.resolve_transport("auto") == "padded"                         # XLA:CPU has no ragged_all_to_all
    mesh = jax.make_mesh((8,), ("ep",))
    t, h, k, e = 32, 256, 8, 64

    def fn(x, idx, w):
        d = ep.ep_dispatch(x, idx, w, num_experts=e, axis_name="ep", transport="ragged", check_ids=False)
        return ep.ep_combine(d.x, d.handle, weighted=True)

    f = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))
    sh = NamedSharding(mesh, P("ep"))
    lowered = cross_lower(f, jax.ShapeDtypeStruct((8 * t, h), jnp.bfloat16, sharding=sh),
                          jax.ShapeDtypeStruct((8 * t, k), jnp.int32, sharding=sh),
                          jax.ShapeDtypeStruct((8 * t, k), jnp.float32, sharding=sh))
    hlo = lowered.emit("stablehlo")
    assert hlo.count("ragged_all_to_all") >= 2                            # dispatch and combine
    assert "all_to_all" not in hlo.replace("ragged_all_to_all", "")


def test_ragged_grad_lowers_for_cuda():
    mesh = jax.make_mesh((4,), ("ep",))

    def loss(x, idx):
        def body(x, idx):
            d = ep.ep_dispatch(x, idx, num_experts=8, axis_name="ep", transport="ragged", check_ids=False)
            return (ep.ep_combine(d.x * 2, d.handle) ** 2).sum()[None]
        return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep"))(x, idx).sum()

    sh = NamedSharding(mesh, P("ep"))
    lowered = cross_lower(jax.grad(loss), jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=sh),
                          jax.ShapeDtypeStruct((64, 4), jnp.int32, sharding=sh))
    assert lowered.emit("stablehlo").count("ragged_all_to_all") >= 4


@pytest.mark.gpu
def test_ragged_runs_on_gpu_and_equals_padded(rng):
    """On the GPUs present (any count): the ragged transport gives the padded transport's results."""
    p = len(jax.devices())
    mesh = jax.make_mesh((p,), ("ep",))
    t, h, k, e = 64, 256, 4, 8 * p
    idx = np.where(rng.random((p * t, k)) < 0.2, -1,
                   np.stack([rng.choice(e, k, replace=False) for _ in range(p * t)])).astype(np.int32)
    x = rng.standard_normal((p * t, h)).astype(jnp.bfloat16)
    w = rng.random((p * t, k)).astype(np.float32)

    def fn(transport):
        def body(x, i, w):
            d = ep.ep_dispatch(x, i, w, num_experts=e, axis_name="ep", transport=transport)
            return d.x, d.topk_idx, d.num_recv[None], ep.ep_combine(d.x, d.handle, weighted=True)
        return body

    got = _run(mesh, fn("ragged"), x, idx, w)
    want = _run(mesh, fn("padded"), x, idx, w)
    for g, wnt in zip(got, want):
        np.testing.assert_array_equal(g, wnt)


def test_fp8_tuple_payload_equals_internal_quantisation(rng):
    """A caller-quantised (x_fp8, scale) from seekax.ops.fp8 travels as-is and equals fp8=True."""
    from seekax.ops.fp8 import quantize_fp8

    x = jnp.asarray(rng.standard_normal((6, 256)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, 8, (6, 2)), jnp.int32)
    xq, scale = quantize_fp8(x)
    a = ep.ep_dispatch((xq, scale), idx, num_experts=8, axis_name=None)
    b = ep.ep_dispatch(x, idx, num_experts=8, axis_name=None, fp8=True)
    np.testing.assert_array_equal(np.asarray(a.x).view(np.uint8), np.asarray(b.x).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(a.x_scale), np.asarray(b.x_scale))
    with pytest.raises(ValueError, match="x_scale.shape"):
        ep.ep_dispatch((xq, scale[:, :1]), idx, num_experts=8, axis_name=None)
