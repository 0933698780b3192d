"""pipeline_train_step on real GPUs (run by scripts/gpu_check.sh with SEEKAX_TEST_GPU=1; skipped elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.layers.pipeline import pipeline_train_step, reference_train_step
from seekax.schedules.registry import make_schedule
from seekax.testing.compare import assert_close

pytestmark = pytest.mark.gpu


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_matches_unpipelined_grad_on_gpus(kind, rng):
    gpus = _gpus()
    n = min(8, len(gpus)) // 2 * 2
    if n < 2:
        pytest.skip("needs at least 2 GPUs")
    s = make_schedule(kind, n, 4 * n)
    d = 256
    params = {"w": jnp.asarray(rng.normal(size=(s.num_stages, d, d)) / np.sqrt(d), jnp.float32),
              "b": jnp.zeros((s.num_stages, d), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(4 * n, 64, d)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(4 * n, 64, d)), jnp.float32)

    def stage_fn(p, x):
        return jnp.tanh(jnp.dot(x, p["w"], precision="highest") + p["b"]) + x

    def loss_fn(y, t):
        return jnp.mean((y - t) ** 2)

    mesh = jax.make_mesh((n,), ("pp",), devices=gpus[:n])
    loss, grads = pipeline_train_step(s, stage_fn, params, xs, loss_fn, mesh=mesh, targets=ts)
    with jax.default_device(gpus[0]):
        rloss, rgrads = reference_train_step(stage_fn, params, xs, loss_fn, ts)
    assert_close(np.asarray(loss), np.asarray(rloss), rtol=1e-4, atol=1e-5)
    for k in rgrads:
        assert_close(np.asarray(grads[k]), np.asarray(rgrads[k]), rtol=1e-4, atol=1e-5)


def test_fb_all_to_all_overlaps_other_stream_on_gpus(rng):
    # The scheduled GPU program (latency hiding scheduler on, async all-to-all) places computation of the
    # other F&B stream between every F&B all-to-all's start and done. Flags: docs/schedules.md.
    import sys
    from pathlib import Path

    from jax.sharding import PartitionSpec as P

    from seekax.layers.pipeline import make_pipeline_value_and_grad
    from seekax.lowering.pipeline_hlo import fb_async_windows

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pipeline_models as pm

    gpus = _gpus()
    if len(gpus) < 4:
        pytest.skip("needs 4 GPUs (pp=2 x ep=2)")
    s = make_schedule("dualpipev", 2, 4)
    params = pm.init_params(rng, s.num_stages)
    mb, tgt = pm.batch(rng, 4, 8)
    mesh = jax.make_mesh((2, 2), ("pp", "ep"), devices=gpus[:4])
    fn = make_pipeline_value_and_grad(s, pm.stages(s.num_stages, "ep", substeps=True), pm.loss_fn, mesh=mesh,
                                      param_specs=pm.param_specs(params, "ep"), batch_spec=P("ep"))
    windows = fb_async_windows(fn.lower(params, (), mb, tgt).compile().as_text())
    assert windows, "no asynchronous F&B collective in the scheduled program"
    assert {w.stream for w in windows if w.other_stream_between > 0} == {"F", "B"}, windows
