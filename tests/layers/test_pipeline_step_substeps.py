"""Stages declared as sub-steps (attention, dispatch all_to_all, experts, combine all_to_all over an expert-
parallel axis): loss and gradients equal jax.value_and_grad of the unpipelined model under every schedule,
with the backward's B/W split too, and the F&B overlap changes nothing numerically."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import pipeline_models as pm
from seekax.layers.pipeline import make_pipeline_train_step, reference_train_step
from seekax.schedules.registry import GENERATORS, make_schedule
from test_pipeline_step_hetero import _check


def _run(kind, rng, **kw):
    s = make_schedule(kind, 2, 4)
    S = s.num_stages
    params = pm.init_params(rng, S)
    mb, tgt = pm.batch(rng, 4, 8)
    mesh = jax.make_mesh((2, 2), ("pp", "ep"), devices=jax.devices()[:4])
    step = make_pipeline_train_step(s, pm.stages(S, "ep", substeps=True), pm.loss_fn, mesh=mesh,
                                    param_specs=pm.param_specs(params, "ep"), batch_spec=P("ep"), **kw)
    loss, grads = step(params, mb, tgt)
    ref = jax.jit(lambda p: reference_train_step(pm.ref_stages(S), p, mb, pm.loss_fn, tgt))(params)
    _check(loss, grads, *ref)
    return loss, grads


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_substep_stages_under_every_schedule(kind, rng):
    _run(kind, rng)


def test_substep_stages_split_backward_and_serial(rng):
    # B and W ops of sub-step stages (the chain of sub-step VJPs, inputs only / weights only), and the
    # serialised F&B: both give the same gradients as the reference.
    _run("dualpipe", rng, split_backward=True)
    _run("dualpipe", np.random.default_rng(1), fb_order="serial")
