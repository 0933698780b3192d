"""pipeline_train_step: loss and gradients equal jax.grad of the unpipelined model, for every schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from seekax.layers.pipeline import (make_pipeline_train_step, pipeline_train_step, pipeline_value_and_grad,
                                         reference_train_step)
from seekax.schedules.interleaved import interleaved_1f1b
from seekax.schedules.registry import GENERATORS, make_schedule
from seekax.testing.compare import assert_close

D, TOKENS = 8, 4


def stage_fn(p, x):
    return jnp.tanh(x @ p["w"] + p["b"]) + 0.5 * x  # x: [tokens, D]


def loss_fn(y, t):
    return jnp.mean((y - t) ** 2)


def _problem(rng, num_stages, m):
    params = {"w": jnp.asarray(rng.normal(size=(num_stages, D, D)) / np.sqrt(D), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(num_stages, D)) * 0.1, jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(m, TOKENS, D)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(m, TOKENS, D)), jnp.float32)
    return params, xs, ts


def _check(got, want):
    (loss, grads), (rloss, rgrads) = got, want
    assert_close(np.asarray(loss), np.asarray(rloss), rtol=1e-5, atol=1e-6)
    for k in rgrads:
        assert grads[k].shape == rgrads[k].shape
        assert_close(np.asarray(grads[k]), np.asarray(rgrads[k]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, m", [(4, 8), (8, 16)])
@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_matches_unpipelined_grad(kind, n, m, rng):
    s = make_schedule(kind, n, m)
    params, xs, ts = _problem(rng, s.num_stages, m)
    mesh = jax.make_mesh((n,), ("pp",), devices=jax.devices()[:n])
    got = pipeline_train_step(s, stage_fn, params, xs, loss_fn, mesh=mesh, targets=ts)
    _check(got, reference_train_step(stage_fn, params, xs, loss_fn, ts))


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe", "dualpipev"])
def test_split_backward(kind, rng):
    s = make_schedule(kind, 4, 8)
    params, xs, ts = _problem(rng, s.num_stages, 8)
    mesh = jax.make_mesh((4,), ("pp",), devices=jax.devices()[:4])
    got = pipeline_train_step(s, stage_fn, params, xs, loss_fn, mesh=mesh, targets=ts, split_backward=True)
    _check(got, reference_train_step(stage_fn, params, xs, loss_fn, ts))


@pytest.mark.parametrize("make, n", [(lambda: make_schedule("1f1b", 1, 3), 1),
                                     (lambda: interleaved_1f1b(2, 4, 3), 2),
                                     (lambda: make_schedule("dualpipe", 2, 4), 2)], ids=["1rank", "v3", "dp2"])
def test_edge_sizes(make, n, rng):
    s = make()
    params, xs, ts = _problem(rng, s.num_stages, s.num_microbatches)
    mesh = jax.make_mesh((n,), ("pp",), devices=jax.devices()[:n])
    got = pipeline_train_step(s, stage_fn, params, xs, loss_fn, mesh=mesh, targets=ts)
    _check(got, reference_train_step(stage_fn, params, xs, loss_fn, ts))


def test_auto_axes_mesh(rng):
    s = make_schedule("dualpipev", 4, 8)
    params, xs, ts = _problem(rng, s.num_stages, 8)
    mesh = jax.make_mesh((4,), ("pp",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    got = pipeline_train_step(s, stage_fn, params, xs, loss_fn, mesh=mesh, targets=ts)
    _check(got, reference_train_step(stage_fn, params, xs, loss_fn, ts))


def test_dualpipe_combines_both_copies(rng):
    # Stage r lives on rank r (stream A) and rank N-1-r (stream B): zeroing one stream's inputs must leave
    # only that stream's share, and the full gradient is the sum over both copies.
    s = make_schedule("dualpipe", 4, 8)
    params, xs, ts = _problem(rng, 4, 8)
    mesh = jax.make_mesh((4,), ("pp",), devices=jax.devices()[:4])
    step = make_pipeline_train_step(s, stage_fn, loss_fn, mesh=mesh)
    _, g = step(params, xs, ts)
    ref_a = reference_train_step(stage_fn, params, xs[:4], loss_fn, ts[:4])[1]
    ref_b = reference_train_step(stage_fn, params, xs[4:], loss_fn, ts[4:])[1]
    for k in g:
        assert_close(np.asarray(g[k]), np.asarray((ref_a[k] + ref_b[k]) / 2), rtol=1e-5, atol=1e-6)


def test_without_targets_and_data_parallel_axis(rng):
    # mesh ("pp", "dp"): micro-batch tokens split over dp; loss is the mean over dp shards.
    s = make_schedule("zb1p", 4, 8)
    params, xs, _ = _problem(rng, 4, 8)
    mesh = jax.make_mesh((4, 2), ("pp", "dp"))

    def loss_sq(y):
        return jnp.mean(y ** 2)

    got = pipeline_train_step(s, stage_fn, params, xs, loss_sq, mesh=mesh, batch_spec=P("dp"))
    _check(got, reference_train_step(stage_fn, params, xs, loss_sq))


def test_stage_collectives_over_extra_axis(rng):
    # A dense "MoE" stage on mesh ("pp", "ep"): tokens split over ep, one expert per ep shard; every token goes
    # to every expert (all_gather), results come back summed (psum_scatter). Reference: the same on one device.
    ep = 2
    s = make_schedule("dualpipe", 4, 8)
    w = jnp.asarray(rng.normal(size=(4, ep, D, D)) / np.sqrt(D), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(8, TOKENS, D)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(8, TOKENS, D)), jnp.float32)

    def moe_stage(p, x):  # p["w"]: [ep_local=1, D, D]; x: [tokens/ep, D]
        everyone = jax.lax.all_gather(x, "ep", axis=0, tiled=True)
        out = jnp.tanh(everyone @ p["w"][0])
        return x + jax.lax.psum_scatter(out, "ep", scatter_dimension=0, tiled=True)

    def ref_stage(p, x):
        return x + sum(jnp.tanh(x @ p["w"][e]) for e in range(ep))

    mesh = jax.make_mesh((4, ep), ("pp", "ep"))
    got = pipeline_train_step(s, moe_stage, {"w": w}, xs, loss_fn, mesh=mesh, targets=ts,
                              param_specs={"w": P("ep", None, None)}, batch_spec=P("ep"))
    _check(got, reference_train_step(ref_stage, {"w": w}, xs, loss_fn, ts))


def test_clear_errors(rng):
    s = make_schedule("1f1b", 4, 4)
    params, xs, ts = _problem(rng, 4, 4)
    mesh4 = jax.make_mesh((4,), ("pp",), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="mesh"):
        pipeline_train_step(s, stage_fn, params, xs, loss_fn, mesh=jax.make_mesh((8,), ("pp",)), targets=ts)
    with pytest.raises(ValueError, match="params"):
        pipeline_train_step(s, stage_fn, jax.tree.map(lambda p: p[:3], params), xs, loss_fn, mesh=mesh4, targets=ts)
    with pytest.raises(ValueError, match="microbatches"):
        pipeline_train_step(s, stage_fn, params, xs[:3], loss_fn, mesh=mesh4, targets=ts[:3])
    with pytest.raises(ValueError, match="stage_fn"):
        pipeline_train_step(s, lambda p, x: x[:, :4], params, xs, loss_fn, mesh=mesh4, targets=ts)
    with pytest.raises(ValueError, match="batch_spec"):
        pipeline_train_step(s, stage_fn, params, xs, loss_fn, mesh=mesh4, targets=ts, batch_spec=P("pp"))


@pytest.mark.parametrize("kind, mesh_shape", [("dualpipe", (4,)), ("interleaved", (4,)), ("1f1b", (4, 2))])
def test_value_and_grad_with_head_and_input_grads(kind, mesh_shape, rng):
    # A trainable head in the loss (loss_params) and d loss / d micro-batch for an embedding before the pipeline.
    s = make_schedule(kind, 4, 8)
    params, xs, ts = _problem(rng, s.num_stages, 8)
    head = {"w": jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D), jnp.float32), "s": jnp.float32(1.5)}

    def head_loss(h, y, t):
        return jnp.mean((h["s"] * jnp.tanh(y @ h["w"]) - t) ** 2)

    def total(params, h, xs):
        def one(i):
            x = xs[i]
            for st in range(s.num_stages):
                x = stage_fn(jax.tree.map(lambda p: p[st], params), x)
            return head_loss(h, x, ts[i])
        return sum(one(i) for i in range(8)) / 8

    rloss, (rg, rh, rx) = jax.value_and_grad(total, argnums=(0, 1, 2))(params, head, xs)
    names = ("pp", "dp")[: len(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, names, devices=jax.devices()[: int(np.prod(mesh_shape))])
    out = pipeline_value_and_grad(s, stage_fn, params, xs, head_loss, mesh=mesh, targets=ts, loss_params=head,
                                  input_grads=True, batch_spec=P("dp") if len(mesh_shape) == 2 else None)
    _check((out.loss, out.grads), (rloss, rg))
    for k in rh:
        assert_close(np.asarray(out.loss_grads[k]), np.asarray(rh[k]), rtol=1e-5, atol=1e-6)
    assert_close(np.asarray(out.input_grads), np.asarray(rx), rtol=1e-5, atol=1e-7)


def test_stage_aux_sums_statistics(rng):
    # stage_fn may return (x, aux): here a per-stage "expert load" histogram of argmax(x), summed over all
    # micro-batches (both DualPipe streams, both copies of each stage) and over the dp shards of the tokens.
    s = make_schedule("dualpipe", 4, 8)
    params, xs, ts = _problem(rng, 4, 8)

    def stage_with_loads(p, x):
        y = stage_fn(p, x)
        return y, {"load": jnp.sum(jax.nn.one_hot(jnp.argmax(y, axis=-1), D), axis=0)}

    mesh = jax.make_mesh((4, 2), ("pp", "dp"))
    out = pipeline_value_and_grad(s, stage_with_loads, params, xs, loss_fn, mesh=mesh, targets=ts, stage_aux=True,
                                  batch_spec=P("dp"))
    _check((out.loss, out.grads), reference_train_step(stage_fn, params, xs, loss_fn, ts))
    want = np.zeros((4, D))
    for i in range(8):
        x = xs[i]
        for st in range(4):
            x, aux = stage_with_loads(jax.tree.map(lambda p: p[st], params), x)
            want[st] += np.asarray(aux["load"])
    np.testing.assert_array_equal(np.asarray(out.aux["load"]), want)
    assert want.sum() == 4 * 8 * TOKENS
