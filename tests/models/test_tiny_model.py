"""The tiny DeepSeek-V3: the pipelined, expert-parallel training step equals the single-device model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from seekax.models import tiny as M
from seekax.demo.train import TrainConfig, batch_to_microbatches
from seekax.layers.pipeline import make_pipeline_train_step, reference_train_step
from seekax.schedules.registry import make_schedule
from seekax.testing import rel_err

SMALL = M.ModelConfig(seq_len=8, fp8_head=False)


def _batch(rng, cfg, microbatches=4, size=4):
    tok = rng.integers(0, cfg.vocab, (microbatches, size, cfg.seq_len + 1))
    return M.tokens_to_stage_input(jnp.asarray(tok[..., :-1]), cfg.hidden), jnp.asarray(tok[..., 1:], jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dualpipev"])
def test_pipelined_ep_step_equals_single_device_model(rng, kind):
    cfg = SMALL
    params = M.init_params(jax.random.key(1), cfg)
    mesh = jax.make_mesh((2, 4), ("pp", "ep"))
    step = make_pipeline_train_step(make_schedule(kind, 2, 4), M.make_stage_fn(cfg, "ep"), M.loss_fn, mesh=mesh,
                                    param_specs=M.param_specs(params, "ep"), batch_spec=P("ep"))
    x, y = _batch(rng, cfg)
    loss, grads = step(params, x, y)
    ref_loss, ref_grads = jax.jit(lambda p: reference_train_step(M.make_stage_fn(cfg), p, x, M.loss_fn, y))(params)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert rel_err(g, r) < 1e-4, jax.tree_util.keystr(path)
    # The expert weights really are learned through the EP path: non-zero gradients on routed slots.
    assert float(jnp.abs(grads["moe"]["w1"]).max()) > 0


def test_forward_shapes_and_expert_loads(rng):
    cfg = dataclasses.replace(SMALL, num_layers=2)
    params = M.init_params(jax.random.key(0), cfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (3, cfg.seq_len)), jnp.int32)
    logits, loads = jax.jit(lambda p, t: M.forward(p, t, cfg))(params, tokens)
    assert logits.shape == (3, cfg.seq_len, cfg.vocab) and np.isfinite(np.asarray(logits)).all()
    # Every token picks top_k distinct experts in every layer.
    np.testing.assert_array_equal(np.asarray(loads).sum(-1), [3 * cfg.seq_len * cfg.moe.top_k] * 2)


def test_replicas_start_equal_to_their_expert():
    cfg = SMALL
    pl = M.initial_placement(cfg)
    params = M.init_params(jax.random.key(0), cfg, pl)
    w1 = np.asarray(params["moe"]["w1"])
    for layer in range(cfg.num_layers):
        for slot, e in enumerate(pl.phy2log[layer]):
            np.testing.assert_array_equal(w1[layer, slot], w1[layer, e])
    np.testing.assert_array_equal(np.asarray(params["logcnt"]), pl.logcnt)


def test_model_config_rejects_mismatched_vocab():
    from seekax.layers.mla import MlaConfig

    with pytest.raises(ValueError, match="vocab"):
        M.ModelConfig(vocab=64)
    with pytest.raises(ValueError, match="num_slots"):
        M.ModelConfig(num_slots=4)
    assert MlaConfig  # imported for the error message's context


def test_batch_layout_is_the_same_for_one_and_two_processes():
    cfg = TrainConfig(microbatches=2, microbatch_size=8, ep=4)
    rows = np.arange(16 * 3).reshape(16, 3)          # global batch, ordered (ep shard, micro-batch, row)
    one = batch_to_microbatches(rows, cfg, 1)        # [M, 8, 3]
    two = np.concatenate([batch_to_microbatches(rows[:8], cfg, 2), batch_to_microbatches(rows[8:], cfg, 2)], 1)
    np.testing.assert_array_equal(one, two)
    # micro-batch m, ep shard e holds global rows e*4 + m*2 + [0, 1]
    np.testing.assert_array_equal(one[1, 2:4, 0], rows[[6, 7], 0])
