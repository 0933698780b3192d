"""Users' own stages: callables that are not hashable, typed PRNG keys riding in the activations, loss functions
that return more than a scalar, micro-batches that do not fit `batch_spec` (each a clear ValueError or a
correct step, not a raw JAX error)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from seekax.layers.pipeline import make_pipeline_train_step, pipeline_train_step, reference_train_step
from seekax.schedules.registry import make_schedule
from seekax.testing.compare import assert_close

D, TOKENS, N, M = 8, 4, 4, 8


def _mesh(n=N, names=("pp",)):
    return jax.make_mesh((n,), names, devices=jax.devices()[:n])


def _data(rng, m=M, tokens=TOKENS):
    xs = jnp.asarray(rng.normal(size=(m, tokens, D)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(m, tokens, D)), jnp.float32)
    return xs, ts


def _params(rng, stages=N):
    return {"w": jnp.asarray(rng.normal(size=(stages, D, D)) / np.sqrt(D), jnp.float32)}


def mse(y, t):
    return jnp.mean((y - t) ** 2)


def _check(got, want):
    (loss, grads), (rloss, rgrads) = got, want
    assert_close(np.asarray(loss), np.asarray(rloss), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads), strict=True):
        assert a.shape == b.shape
        assert_close(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@dataclasses.dataclass
class Block:
    """A callable stage object: a plain (non-frozen) dataclass, hence unhashable, like many users' modules."""

    scale: float = 1.0

    def __call__(self, p, x):
        return x + self.scale * jnp.tanh(x @ p["w"])


class UnhashableLoss:
    __hash__ = None

    def __call__(self, y, t):
        return jnp.mean((y - t) ** 2)


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe"])
def test_unhashable_callable_stage_and_loss(kind, rng):
    s = make_schedule(kind, N, M)
    params, (xs, ts) = _params(rng, s.num_stages), _data(rng)
    block = Block(0.5)
    want = reference_train_step(block, params, xs, mse, ts)
    _check(pipeline_train_step(s, block, params, xs, UnhashableLoss(), mesh=_mesh(), targets=ts), want)
    _check(make_pipeline_train_step(s, block, mse, mesh=_mesh())(params, xs, ts), want)
    # a list of them: one object for every stage shares one class (traced once), distinct ones do not
    stages = [block] * s.num_stages
    per_stage = [{"w": params["w"][i]} for i in range(s.num_stages)]
    loss, grads = pipeline_train_step(s, stages, per_stage, xs, mse, mesh=_mesh(), targets=ts)
    _check((loss, {"w": jnp.stack([g["w"] for g in grads])}), want)


def test_unhashable_stage_is_cached_per_object(rng):
    s = make_schedule("1f1b", N, M)
    params, (xs, ts) = _params(rng), _data(rng)
    calls = []

    @dataclasses.dataclass
    class Counting:
        def __call__(self, p, x):
            calls.append(1)
            return x + jnp.tanh(x @ p["w"])

    block = Counting()
    pipeline_train_step(s, block, params, xs, mse, mesh=_mesh(), targets=ts)
    traced = len(calls)
    pipeline_train_step(s, block, params, xs, mse, mesh=_mesh(), targets=ts)
    assert len(calls) == traced  # no retrace for the same object


def dropout_stage(p, a):
    key, sub = jax.random.split(a["key"])
    keep = jax.random.bernoulli(sub, 0.75, a["h"].shape) & a["mask"][:, None]
    h = a["h"] + jnp.where(keep, jnp.tanh(a["h"] @ p["w"]), 0.0) / 0.75
    return {"h": h, "key": key, "mask": a["mask"]}


def h_mse(y, t):
    return jnp.mean((y["h"] - t) ** 2)


@pytest.mark.parametrize("kind", ["zb1p", "dualpipev"])
def test_typed_prng_keys_ride_in_activations(kind, rng):
    """Dropout keys made with jax.random.key (an extended dtype) travel with the activation like integers."""
    s = make_schedule(kind, N, M)
    params, (xs, ts) = _params(rng, s.num_stages), _data(rng)
    mb = {"h": xs, "key": jax.random.split(jax.random.key(0), M),
          "mask": jnp.asarray(rng.integers(0, 2, (M, TOKENS)).astype(bool))}
    got = pipeline_train_step(s, dropout_stage, params, mb, h_mse, mesh=_mesh(), targets=ts)
    _check(got, reference_train_step(dropout_stage, params, mb, h_mse, ts))


@pytest.mark.parametrize("out", [lambda l, y: (l, {"y": y}), lambda l, y: {"loss": l}, lambda l, y: [l]],
                         ids=["tuple", "dict", "list"])
def test_error_loss_returning_a_pytree(out, rng):
    s = make_schedule("1f1b", N, M)
    params, (xs, ts) = _params(rng), _data(rng)

    def loss_with_aux(y, t):
        return out(jnp.mean((y - t) ** 2), y)

    with pytest.raises(ValueError, match=r"loss_fn=.*a float scalar"):
        pipeline_train_step(s, Block(), params, xs, loss_with_aux, mesh=_mesh(), targets=ts)


def test_error_missing_targets(rng):
    s = make_schedule("1f1b", N, M)
    params, (xs, _) = _params(rng), _data(rng)
    step = make_pipeline_train_step(s, Block(), mse, mesh=_mesh())
    with pytest.raises(ValueError, match=r"targets=None: expected .*with_targets=False"):
        step(params, xs)


def test_error_targets_given_to_a_step_without_targets(rng):
    s = make_schedule("1f1b", N, M)
    params, (xs, ts) = _params(rng), _data(rng)
    step = make_pipeline_train_step(s, Block(), lambda y: (y ** 2).mean(), mesh=_mesh(), with_targets=False)
    with pytest.raises(ValueError, match=r"targets=.*with_targets=False"):
        step(params, xs, ts)                                  # would be silently ignored by loss_fn(y)


def test_error_batch_spec_does_not_fit_microbatches(rng):
    mesh = jax.make_mesh((2, N), ("dp", "pp"), devices=jax.devices()[:2 * N])
    s = make_schedule("1f1b", N, M)
    params = _params(rng)
    xs, ts = _data(rng, tokens=3)  # 3 tokens per micro-batch do not split over dp = 2
    with pytest.raises(ValueError, match=r"batch_spec for microbatches.*dim 0 of .*\(3, 8\).*divisible by 2"):
        pipeline_train_step(s, Block(), params, xs, mse, mesh=mesh, targets=ts, batch_spec=P("dp"))
    xs, ts = _data(rng)
    ts = {"t": ts, "w": jnp.ones((M, 3))}  # a targets leaf with 3 per micro-batch
    with pytest.raises(ValueError, match=r"batch_spec for targets\['w'\].*dim 0 of .*\(3,\).*divisible by 2"):
        pipeline_train_step(s, Block(), params, xs, lambda y, t: mse(y, t["t"]), mesh=mesh, targets=ts,
                            batch_spec=P("dp"))
    with pytest.raises(ValueError, match=r"batch_spec for microbatches=.*at most one entry per dim"):
        pipeline_train_step(s, Block(), params, xs, mse, mesh=mesh, targets=ts["t"],
                            batch_spec=P("dp", None, None))


def test_dp_by_pp_mesh_with_batch_spec(rng):
    mesh = jax.make_mesh((2, N), ("dp", "pp"), devices=jax.devices()[:2 * N])
    s = make_schedule("dualpipe", N, M)
    params, (xs, ts) = _params(rng, s.num_stages), _data(rng)
    got = pipeline_train_step(s, Block(), params, xs, mse, mesh=mesh, targets=ts, batch_spec=P("dp"))
    _check(got, reference_train_step(Block(), params, xs, mse, ts))


@pytest.mark.parametrize("collective", [
    lambda x: jax.lax.psum(x, "pp"),
    lambda x: jax.lax.cond(x.sum() > 0, lambda v: jax.lax.ppermute(v, "pp", [(0, 1), (1, 0)]), lambda v: v, x),
], ids=["psum", "ppermute_in_cond"])
def test_error_collective_over_pp_in_a_stage(collective, rng):
    """Ranks run different stages in a tick: a collective over pp would hang the step (and abort the process
    after XLA's rendezvous timeout), so it is refused before anything runs."""
    s = make_schedule("1f1b", 2, 4)
    params, (xs, ts) = _params(rng, 2), _data(rng, m=4)

    def stage(p, x):
        return x + jnp.tanh(collective(x) @ p["w"])

    with pytest.raises(ValueError, match=r"stage 0 \(stage\)=.*collectives over 'pp'.*no collective over the "
                                         r"pipeline axis 'pp'"):
        pipeline_train_step(s, stage, params, xs, mse, mesh=_mesh(2), targets=ts)
