"""Heterogeneous stages (an embedding stage, MoE stages of different layer counts, a head stage; pytree
activations with an integer leaf): loss and every gradient leaf equal jax.value_and_grad of the unpipelined
model under every schedule, on 4 and 8 devices and with an expert-parallel axis whose stages call collectives;
each rank's parameter rows hold only its own stages; bad stage lists and shapes fail before tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import pipeline_models as pm
from seekax.layers.pipeline import (Stage, make_pipeline_value_and_grad, pipeline_train_step,
                                    pipeline_value_and_grad, reference_train_step)
from seekax.schedules.registry import GENERATORS, make_schedule
from seekax.testing.compare import assert_close

TOKENS = 8


def _reference(num_stages, params, mb, tgt):
    return jax.jit(lambda p: reference_train_step(pm.ref_stages(num_stages), p, mb, pm.loss_fn, tgt))(params)


def _check(loss, grads, rloss, rgrads):
    assert_close(np.asarray(loss), np.asarray(rloss), rtol=1e-5, atol=0, name="loss")
    assert len(grads) == len(rgrads)
    for st, (g, r) in enumerate(zip(grads, rgrads)):
        assert jax.tree.structure(g) == jax.tree.structure(r)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(r)):
            scale = float(np.abs(np.asarray(b)).max())
            # rel 1e-5 of the leaf: in norm, and per element against the leaf's largest magnitude (sums over
            # ep shards and micro-batches run in another order than the reference's)
            assert_close(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale, max_rel_err=1e-5,
                         name=f"grads[{st}]{jax.tree_util.keystr(path)}")


def _run(kind, pp, ep, rng, microbatches):
    s = make_schedule(kind, pp, microbatches)
    S = s.num_stages
    params = pm.init_params(rng, S)
    mb, tgt = pm.batch(rng, microbatches, TOKENS)
    if ep:
        mesh = jax.make_mesh((pp, ep), ("pp", "ep"), devices=jax.devices()[: pp * ep])
        loss, grads = pipeline_train_step(s, pm.stages(S, "ep"), params, mb, pm.loss_fn, mesh=mesh, targets=tgt,
                                          param_specs=pm.param_specs(params, "ep"), batch_spec=P("ep"))
    else:
        mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
        loss, grads = pipeline_train_step(s, pm.stages(S), params, mb, pm.loss_fn, mesh=mesh, targets=tgt)
    _check(loss, grads, *_reference(S, params, mb, tgt))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_heterogeneous_stages_4_devices(kind, rng):
    _run(kind, 4, None, rng, 8)


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_heterogeneous_stages_expert_parallel(kind, rng):
    # mesh pp=4 x ep=2 (8 devices): experts split over ep, tokens split over ep, all_gather / psum_scatter
    # over ep inside every MoE layer.
    _run(kind, 4, 2, rng, 8)


@pytest.mark.slow  # 8 and 16 stages of 4 stage classes: ~30-60 s each on 2 cores
@pytest.mark.parametrize("kind", ["1f1b", "dualpipev"])  # every schedule runs on 4 (and 4 x ep=2) above
def test_heterogeneous_stages_8_devices(kind, rng):
    _run(kind, 8, None, rng, 16)


def test_rows_hold_only_own_stages(rng):
    # Rank r's rows are exactly the concatenated parameters of the stages its chunks hold, zero-padded.
    s = make_schedule("dualpipev", 2, 4)
    params = pm.init_params(rng, s.num_stages)
    mesh = jax.make_mesh((2,), ("pp",), devices=jax.devices()[:2])
    fn = make_pipeline_value_and_grad(s, pm.stages(s.num_stages), pm.loss_fn, mesh=mesh)
    mb, tgt = pm.batch(rng, 4, TOKENS)
    rows = {k: np.asarray(v) for k, v in fn.pack_params(params, (), mb, tgt).items()}
    sizes = [sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p)) for p in params]
    (key,) = rows
    assert rows[key].shape == (2, 2, max(sizes))  # [ranks, chunks, largest stage]
    for r in range(2):
        for c in range(2):
            st = s.chunk_stages[r][c]
            flat = np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(params[st])])
            np.testing.assert_array_equal(rows[key][r, c, : sizes[st]], flat)
            assert not rows[key][r, c, sizes[st]:].any()


def test_value_and_grad_with_input_grads_and_aux(rng):
    # Float micro-batches (an embedding applied before the pipeline), a per-stage aux statistic of different
    # shapes per stage, and input gradients, under DualPipe on 4 ranks.
    s = make_schedule("dualpipe", 4, 8)
    widths = [8, 6, 6, 4]  # activation widths change from stage to stage
    ws = [jnp.asarray(rng.normal(size=(widths[i], widths[i + 1] if i < 3 else 5)) / 3, jnp.float32)
          for i in range(4)]
    params = [{"w": w} for w in ws]

    def make(i):
        def stage(p, x):
            y = jnp.tanh(x @ p["w"])
            return y, {"count": jnp.sum(y > 0, axis=0), "total": jnp.sum(y)[None] * (i + 1)}
        return stage

    fns = [make(i) for i in range(4)]
    xs = jnp.asarray(rng.normal(size=(8, TOKENS, 8)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(8, TOKENS, 5)), jnp.float32)

    def loss(y, t):
        return jnp.mean((y - t) ** 2)

    def total(ps, xs):
        out = 0.0
        for m in range(8):
            x = xs[m]
            for f, p in zip(fns, ps):
                x = f(p, x)[0]
            out = out + loss(x, ts[m])
        return out / 8

    rloss, (rg, rx) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(params, xs)
    mesh = jax.make_mesh((4,), ("pp",), devices=jax.devices()[:4])
    out = pipeline_value_and_grad(s, fns, params, xs, loss, mesh=mesh, targets=ts, input_grads=True,
                                  stage_aux=True)
    _check(out.loss, out.grads, rloss, rg)
    assert_close(np.asarray(out.input_grads), np.asarray(rx), rtol=1e-5, atol=1e-7)
    for st in range(4):  # aux: summed over all micro-batches
        want_c, want_t = np.zeros(ws[st].shape[1]), 0.0
        for m in range(8):
            x = xs[m]
            for f, p in zip(fns[: st + 1], params[: st + 1]):
                x, aux = f(p, x)
            want_c += np.asarray(aux["count"])
            want_t += float(aux["total"][0])
        np.testing.assert_array_equal(np.asarray(out.aux[st]["count"]), want_c)
        assert_close(np.asarray(out.aux[st]["total"]), np.asarray([want_t]), rtol=1e-5, atol=1e-5)


# --- errors before tracing -------------------------------------------------------------------------------------


def _mesh4():
    return jax.make_mesh((4,), ("pp",), devices=jax.devices()[:4])


@pytest.fixture
def problem(rng):
    s = make_schedule("1f1b", 4, 4)
    return s, pm.init_params(rng, 4), *pm.batch(rng, 4, TOKENS)


def test_error_stage_list_length(problem):
    s, params, mb, tgt = problem
    with pytest.raises(ValueError, match=r"stage_fn=.*3 stage functions.*one per stage.*\(4\)"):
        pipeline_train_step(s, pm.stages(4)[:3], params, mb, pm.loss_fn, mesh=_mesh4(), targets=tgt)


def test_error_params_list_length(problem):
    s, params, mb, tgt = problem
    with pytest.raises(ValueError, match=r"params=.*a list of 4 per-stage"):
        pipeline_train_step(s, pm.stages(4), params[:3], mb, pm.loss_fn, mesh=_mesh4(), targets=tgt)


def test_error_not_a_stage(problem):
    s, params, mb, tgt = problem
    with pytest.raises(ValueError, match=r"stage_fn\[2\]"):
        pipeline_train_step(s, pm.stages(4)[:2] + [42] + pm.stages(4)[3:], params, mb, pm.loss_fn, mesh=_mesh4(),
                            targets=tgt)


def test_error_bad_stage_definitions():
    with pytest.raises(ValueError, match="exactly one of fn and substeps"):
        Stage()
    with pytest.raises(ValueError, match="exactly one of fn and substeps"):
        Stage(fn=pm.embed_stage, substeps=[pm.make_substep_stage(None)(0, 1)[0]])
    with pytest.raises(ValueError, match=r"Stage.substeps\[0\]"):
        Stage(substeps=[pm.embed_stage])


def test_error_boundary_mismatch_names_the_stage(problem):
    # Stage 2 gets stage 1's {"h": [T, 8], "ids"} but expects a width-6 activation.
    s, params, mb, tgt = problem
    bad = list(params)
    bad[2] = dict(bad[2], wa=jnp.zeros((3, 6, 6), jnp.float32))
    with pytest.raises(ValueError, match=r"stage 2 \(moe_stage\) failed on its input .*float32\[8, 8\]"):
        pipeline_train_step(s, pm.stages(4), bad, mb, pm.loss_fn, mesh=_mesh4(), targets=tgt)


def test_error_loss_input_mismatch(problem):
    s, params, mb, tgt = problem
    with pytest.raises(ValueError, match=r"loss_fn=.*last stage's output"):
        pipeline_train_step(s, pm.stages(4), params, mb, pm.loss_fn, mesh=_mesh4(), targets=tgt[:, :3])


def test_error_loss_not_scalar(problem):
    s, params, mb, tgt = problem
    with pytest.raises(ValueError, match=r"loss_fn=.*a float scalar"):
        pipeline_train_step(s, pm.stages(4), params, mb, lambda y, t: y, mesh=_mesh4(), targets=tgt)


def test_error_stage_output_not_arrays(problem):
    s, params, mb, tgt = problem
    fns = pm.stages(4)
    fns[1] = lambda p, a: {"h": a["h"], "ids": a["ids"], "tag": "x"}
    with pytest.raises(ValueError, match=r"stage 1 .*output\['tag'\]=.*arrays only"):
        pipeline_train_step(s, fns, params, mb, pm.loss_fn, mesh=_mesh4(), targets=tgt)


def test_error_param_specs(problem, rng):
    s, params, mb, tgt = problem
    mesh = jax.make_mesh((4, 2), ("pp", "ep"))
    specs = pm.param_specs(params, "ep")
    with pytest.raises(ValueError, match="param_specs"):
        pipeline_train_step(s, pm.stages(4, "ep"), params, mb, pm.loss_fn, mesh=mesh, targets=tgt,
                            param_specs=specs[:3], batch_spec=P("ep"))
    specs[1] = dict(specs[1], w1=P(None, "pp"))
    with pytest.raises(ValueError, match=r"param_specs\[1\]\['w1'\]"):
        pipeline_train_step(s, pm.stages(4, "ep"), params, mb, pm.loss_fn, mesh=mesh, targets=tgt,
                            param_specs=specs, batch_spec=P("ep"))
    specs[1] = dict(specs[1], w1=P(None, None, "ep"))  # D=8 splits, but on the wrong dim for the stage: fine
    bad = dict(specs[1], wa=P(None, None, None, "ep"))
    specs[1] = bad
    with pytest.raises(ValueError, match=r"param_specs\[1\]\['wa'\]"):
        pipeline_train_step(s, pm.stages(4, "ep"), params, mb, pm.loss_fn, mesh=mesh, targets=tgt,
                            param_specs=specs, batch_spec=P("ep"))


def test_error_microbatch_counts(problem):
    s, params, mb, tgt = problem
    short = {"ids": mb["ids"][:3], "mask": mb["mask"]}
    with pytest.raises(ValueError, match=r"microbatches.shape"):
        pipeline_train_step(s, pm.stages(4), params, short, pm.loss_fn, mesh=_mesh4(), targets=tgt)
    with pytest.raises(ValueError, match=r"targets.shape"):
        pipeline_train_step(s, pm.stages(4), params, mb, pm.loss_fn, mesh=_mesh4(), targets=tgt[:3])


def test_error_input_grads_of_integer_microbatches(problem):
    s, params, mb, tgt = problem
    with pytest.raises(ValueError, match=r"microbatches\['ids'\].dtype"):
        pipeline_value_and_grad(s, pm.stages(4), params, mb, pm.loss_fn, mesh=_mesh4(), targets=tgt,
                                input_grads=True)
