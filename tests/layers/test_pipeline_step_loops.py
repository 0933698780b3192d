"""Stage functions whose layers run under lax.scan, lax.fori_loop, jax.checkpoint or a rematerialised scan
over a layer stack (flax's nn.scan pattern) lower under every schedule and match jax.value_and_grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.layers.pipeline import pipeline_train_step, reference_train_step
from seekax.schedules.registry import GENERATORS, make_schedule
from seekax.testing.compare import assert_close

D, TOKENS, LAYERS = 8, 6, 3


def _layer(w, b, x):  # x: [tokens, D]
    return jnp.tanh(x @ w + b) + 0.5 * x


def scan_stage(p, x):
    def body(h, wb):
        return _layer(*wb, h), None

    return jax.lax.scan(body, x, (p["w"], p["b"]))[0]


def fori_stage(p, x):
    return jax.lax.fori_loop(0, LAYERS, lambda i, h: _layer(p["w"][i], p["b"][i], h), x)


@jax.checkpoint
def checkpoint_stage(p, x):
    for i in range(LAYERS):
        x = _layer(p["w"][i], p["b"][i], x)
    return x


def remat_scan_stage(p, x):
    # flax's nn.scan(nn.remat(Block)): a scan over stacked layer params whose body is rematerialised.
    body = jax.checkpoint(lambda h, wb: (_layer(*wb, h), jnp.sum(h)), prevent_cse=False)
    h, sums = jax.lax.scan(body, x, (p["w"], p["b"]))
    return h + 0.0 * sums[-1]


STAGES = {"scan": scan_stage, "fori_loop": fori_stage, "checkpoint": checkpoint_stage,
          "remat_scan": remat_scan_stage}


def loss_fn(y, t):
    return jnp.mean((y - t) ** 2)


@pytest.mark.parametrize("variant", sorted(STAGES))
@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_loop_stages_under_every_schedule(kind, variant, rng):
    s = make_schedule(kind, 2, 4)  # two ranks: the smallest program every schedule has
    params = {"w": jnp.asarray(rng.normal(size=(s.num_stages, LAYERS, D, D)) / np.sqrt(D), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(s.num_stages, LAYERS, D)) * 0.1, jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(4, TOKENS, D)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(4, TOKENS, D)), jnp.float32)
    mesh = jax.make_mesh((2,), ("pp",), devices=jax.devices()[:2])
    stage = STAGES[variant]
    loss, grads = pipeline_train_step(s, stage, params, xs, loss_fn, mesh=mesh, targets=ts)
    rloss, rgrads = jax.jit(lambda p: reference_train_step(stage, p, xs, loss_fn, ts))(params)  # eager: 10x slower
    assert_close(np.asarray(loss), np.asarray(rloss), rtol=1e-5, atol=1e-6)
    for k in rgrads:
        assert_close(np.asarray(grads[k]), np.asarray(rgrads[k]), rtol=1e-5, atol=1e-6)
