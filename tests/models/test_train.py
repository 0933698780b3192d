"""Fine-tuning: the pipelined step over (pp, ep) with the model's own layers as heterogeneous stages equals
jax.value_and_grad of the unpipelined model; `seekax train` trains, checkpoints and saves a directory that
`seekax generate` serves."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seekax.models.checkpoint import load_checkpoint
from seekax.models.deepseek import forward, loss_fn
from seekax.models.train import Trainer, TrainConfig, merge_stages, split_layers, split_stages
from seekax.testing import rel_err

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "models")


def test_split_layers():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="num_hidden_layers=2.*4 stages"):
        split_layers(2, 4)


@pytest.mark.slow
def test_pipelined_step_equals_the_unpipelined_model(rng):
    cfg, params = load_checkpoint(os.path.join(DATA, "v3_qlora_grouped"), dtype=np.float32, mtp=False,
                                  progress=False)
    tcfg = TrainConfig(pp=2, ep=2, microbatches=2, microbatch_size=2, lr=1e-3)
    trainer = Trainer(params, cfg, tcfg, backend="xla")
    assert trainer.stages == [range(0, 2), range(2, 3)]               # dense + MoE layer, then MoE + head
    tokens = rng.integers(0, cfg.vocab, (2, 2, 9)).astype(np.int32)
    loss, grads = trainer.loss_and_grads(tokens)

    def ref(p):
        logits, _ = forward(p, jnp.asarray(tokens[..., :-1].reshape(4, 8)), cfg, backend="xla")
        return loss_fn(logits, jnp.asarray(tokens[..., 1:].reshape(4, 8)))

    want_loss, want_grads = jax.value_and_grad(ref)(jax.tree.map(jnp.asarray, params))
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    got, want = jax.tree.leaves(grads), jax.tree.leaves(split_stages(want_grads, trainer.stages))
    assert len(got) == len(want)
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-4
    before = float(loss)
    for _ in range(3):
        trainer.train_step(tokens)
    assert trainer.history[-1]["loss"] < before                        # the same batch: it learns
    merged = merge_stages(trainer.params)
    assert len(merged["layers"]) == cfg.num_layers


@pytest.mark.slow
def test_train_command_trains_checkpoints_and_saves_a_servable_directory(tmp_path, capsys):
    from seekax.cli.main import main
    from seekax.storage.sample_store import write_token_store

    write_token_store(tmp_path / "store", np.random.default_rng(0).integers(0, 300, (32, 13)).astype(np.int32))
    rc = main(["train", "--model", os.path.join(DATA, "v2_lite"), "--data", str(tmp_path / "store"), "--steps", "2",
               "--pp", "2", "--ep", "2", "--schedule", "dualpipe", "--overlap", "--warmup", "1", "--clip-norm", "1",
               "--microbatches", "4", "--microbatch-size", "2", "--lr", "1e-3",
               "--ckpt-dir", str(tmp_path / "ckpt"), "--save", str(tmp_path / "out"), "--json", "--backend", "xla",
               "--redundant-experts", "2", "--eplb-every", "1", "--fp8"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h["step"] for h in out["history"]] == [1, 2] and out["stages"] == [[0, 1], [1, 2]]
    assert [e["step"] for e in out["eplb"]] == [1, 2] and all(np.isfinite(h["loss"]) for h in out["history"])
    assert os.listdir(tmp_path / "ckpt")
    cfg, params = load_checkpoint(tmp_path / "out", progress=False)
    assert cfg.num_layers == 2 and params["layers"][1]["moe"]["w1"].dtype == np.float32
    assert main(["generate", "--model", str(tmp_path / "out"), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--json", "--backend", "xla"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["output_ids"]) == 3


@pytest.mark.slow
def test_train_command_takes_a_native_fp8_checkpoint_and_keeps_its_chat_template(tmp_path, capsys):
    """DeepSeek's FP8 release layout: trained from float32 master weights dequantised from it (said on stderr),
    saved as a float directory whose chat template (a chat_template.jinja beside the tokenizer) survives."""
    import shutil

    from seekax.cli.main import main
    from seekax.storage.sample_store import write_token_store

    src = tmp_path / "fp8"
    shutil.copytree(os.path.join(DATA, "v3_fp8"), src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    write_token_store(tmp_path / "store", np.random.default_rng(1).integers(0, 300, (16, 9)).astype(np.int32))
    rc = main(["train", "--model", str(src), "--data", str(tmp_path / "store"), "--steps", "1", "--pp", "2",
               "--ep", "2", "--microbatches", "2", "--microbatch-size", "2", "--save", str(tmp_path / "out"),
               "--json", "--backend", "xla", "--fp8"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "FP8 weights are dequantised" in captured.err
    assert np.isfinite(json.loads(captured.out.strip().splitlines()[-1])["history"][0]["loss"])
    cfg, params = load_checkpoint(tmp_path / "out", progress=False)
    assert params["layers"][1]["moe"]["w1"].dtype == np.float32 and cfg.fp8_block is None
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()


@pytest.mark.slow
def test_eplb_replicas_and_rebalancing_leave_the_training_math_unchanged(rng):
    """With 2 redundant expert slots a layer and a rebalance after step 2, the losses are those of the model
    without replicas (replicas get summed gradients and stay equal; migration moves weights and Adam moments)."""
    cfg, params = load_checkpoint(os.path.join(DATA, "v3_qlora_grouped"), dtype=np.float32, mtp=False,
                                  progress=False)
    tokens = rng.integers(0, cfg.vocab, (2, 2, 9)).astype(np.int32)
    kw = dict(pp=2, ep=2, microbatches=2, microbatch_size=2, lr=1e-3)
    plain = Trainer(params, cfg, TrainConfig(**kw), backend="xla")
    eplb = Trainer(params, cfg, TrainConfig(**kw, redundant_experts=2, eplb_every=2), backend="xla")
    assert eplb.params[0]["layers"][1]["moe"]["w1"].shape[0] == 10                  # 8 experts + 2 replicas
    for _ in range(3):
        a, b = plain.train_step(tokens), eplb.train_step(tokens)
        assert abs(a - b) <= 1e-5 * abs(a)
    assert len(eplb.eplb_history) == 1 and eplb.eplb_history[0]["slots_moved"] > 0
    after = eplb.eplb_history[0]["max_over_mean_after"]
    assert all(x <= y + 1e-9 for x, y in zip(after, eplb.eplb_history[0]["max_over_mean_before"]))
    moe = eplb.params[0]["layers"][1]["moe"]
    w, p2l, first = np.asarray(moe["w1"]), eplb.placement.phy2log[0], np.asarray(moe["log2phy"])[:, 0].astype(int)
    for s in range(10):                                                        # every replica equals its expert's
        np.testing.assert_array_equal(w[s], w[first[p2l[s]]])
    merged = eplb.model_params()
    assert merged["layers"][1]["moe"]["w1"].shape[0] == 8 and "log2phy" not in merged["layers"][1]["moe"]


@pytest.mark.slow
def test_fp8_training_runs_every_projection_and_expert_through_fp8_within_its_error(rng):
    """TrainConfig(fp8=True): attention, dense MLP, shared and routed experts (with EPLB replicas) trained
    through FP8 GEMMs. Every gradient within calc_diff 1e-3 of the float model's, yet not equal to it (the
    FP8 path ran); replicas stay equal after a step; model_params() returns plain float weights."""
    from seekax.layers.linear import Fp8Train
    from seekax.testing import calc_diff

    cfg, params = load_checkpoint(os.path.join(DATA, "v3_qlora_grouped"), dtype=np.float32, mtp=False,
                                  progress=False)
    tokens = rng.integers(0, cfg.vocab, (2, 2, 9)).astype(np.int32)
    kw = dict(pp=2, ep=2, microbatches=2, microbatch_size=2, lr=1e-3, redundant_experts=2)
    plain = Trainer(params, cfg, TrainConfig(**kw), backend="xla")
    fp8 = Trainer(params, cfg, TrainConfig(**kw, fp8=True), backend="xla")
    moe = fp8.params[0]["layers"][1]["moe"]
    assert all(isinstance(moe[k], Fp8Train) for k in ("w1", "w2", "w3", "shared_w1", "shared_w2", "shared_w3"))
    (la, ga), (lb, gb) = plain.loss_and_grads(tokens), fp8.loss_and_grads(tokens)
    assert abs(float(lb) - float(la)) < 0.05 * float(la)
    is_fp8 = lambda x: isinstance(x, Fp8Train)  # noqa: E731
    flat_b = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda x: x.w if is_fp8(x) else x, gb, is_leaf=is_fp8))
    flat_a = jax.tree.leaves(ga)
    assert len(flat_a) == len(flat_b)
    for (path, b), a in zip(flat_b, flat_a):
        name = jax.tree_util.keystr(path)
        if "log2phy" in name or "logcnt" in name or "gate_bias" in name:
            continue
        diff = calc_diff(np.asarray(b), np.asarray(a))
        assert diff < 1e-3, (name, diff)
        if name.endswith(("['w1']", "['w2']", "['w3']")):
            assert diff > 0, name                                      # the FP8 path, not the float one
    fp8.train_step(tokens)
    moe = fp8.params[0]["layers"][1]["moe"]
    w1, p2l = np.asarray(moe["w1"].w), fp8.placement.phy2log[0]
    first = np.asarray(moe["log2phy"])[:, 0].astype(int)
    for s in range(w1.shape[0]):                                       # replicas stay equal (summed gradients)
        np.testing.assert_array_equal(w1[s], w1[first[p2l[s]]])
    out = fp8.model_params()["layers"][1]["moe"]
    assert isinstance(out["w1"], np.ndarray) and out["w1"].shape == (8, *params["layers"][1]["moe"]["w1"].shape[1:])


@pytest.mark.slow
def test_mtp_loss_and_gradients_equal_the_unpipelined_model(rng):
    """The MTP modules trained as DeepSeek-V3 does: loss = next-token loss + lambda x their mean loss, with the
    embedding and head shared; pipelined gradients (stages and MTP) equal value_and_grad of the model."""
    from seekax.models.deepseek import mtp_forward

    cfg, params = load_checkpoint(os.path.join(DATA, "v3_qlora_grouped"), dtype=np.float32, progress=False)
    tokens = rng.integers(0, cfg.vocab, (2, 2, 9)).astype(np.int32)
    tr = Trainer(params, cfg, TrainConfig(pp=2, ep=2, microbatches=2, microbatch_size=2, lr=1e-3, mtp_weight=0.3),
                 backend="xla")
    loss, grads = tr.loss_and_grads(tokens)
    x, t = jnp.asarray(tokens[..., :-1].reshape(4, 8)), jnp.asarray(tokens[..., 1:].reshape(4, 8))

    def ref(p):
        logits, _, h = forward(p, x, cfg, backend="xla", with_hidden=True)
        outs = mtp_forward(p, h, x, cfg, backend="xla")
        return loss_fn(logits, t) + 0.3 * sum(loss_fn(o, t[:, k:]) for k, o in enumerate(outs, 1)) / len(outs)

    want_loss, want = jax.value_and_grad(ref)(jax.tree.map(jnp.asarray, params))
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * float(want_loss)
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(split_stages(want, tr.stages))))
    pairs += list(zip(jax.tree.leaves(tr.mtp_grads), jax.tree.leaves(want["mtp"])))
    assert max(rel_err(a, b) for a, b in pairs) < 1e-4
    tr.train_step(tokens)
    assert set(tr.model_params()["mtp"][0]) == {"eh_proj", "enorm", "hnorm", "layer", "norm"}


def _four_layer_model():
    """v3_qlora_grouped with 4 layers (1 dense + 3 MoE): DualPipeV on pp=2 has 4 stages, one layer each."""
    from seekax.models.deepseek import init_params
    from seekax.models.deepseek_config import from_hf_config

    with open(os.path.join(DATA, "v3_qlora_grouped", "config.json")) as f:
        hf = json.load(f)
    cfg = from_hf_config({**hf, "num_hidden_layers": 4, "num_nextn_predict_layers": 0})
    return cfg, jax.tree.map(np.asarray, init_params(jax.random.key(3), cfg))


@pytest.mark.slow
def test_overlapped_moe_stages_equal_the_unpipelined_model_and_keep_the_streams_apart(rng):
    """DeepSeek-V3's F&B overlap on the real model: MoE stages as attention / dispatch / experts / combine
    sub-steps under DualPipeV over (pp=2, ep=2). The loss and every gradient equal value_and_grad of the
    unpipelined model (with EPLB replica slots), and in the lowered program no data dependency runs from one
    F&B stream's all-to-all to the other stream's computation."""
    from seekax.layers.pipeline import Stage
    from seekax.lowering.pipeline_hlo import fb_stream_reports

    cfg, params = _four_layer_model()
    tokens = rng.integers(0, cfg.vocab, (4, 2, 9)).astype(np.int32)
    tcfg = TrainConfig(pp=2, ep=2, schedule="dualpipev", microbatches=4, microbatch_size=2, lr=1e-3, overlap=True,
                       redundant_experts=2)
    tr = Trainer(params, cfg, tcfg, backend="xla")
    assert tr.stages == [range(i, i + 1) for i in range(4)]
    assert not isinstance(tr.stage_fns[0], Stage)                           # embedding + dense layer: one function
    names = [[s.name for s in st.substeps] for st in tr.stage_fns[1:]]
    assert names[0] == ["attention1", "dispatch1", "experts1", "combine1"]
    assert names[-1] == ["attention3", "dispatch3", "experts3", "combine3", "head"]
    assert [s.comm for s in tr.stage_fns[1].substeps] == [False, True, False, True]
    loss, grads = tr.loss_and_grads(tokens)

    def ref(p):
        logits, _ = forward(p, jnp.asarray(tokens[..., :-1].reshape(8, 8)), cfg, backend="xla")
        return loss_fn(logits, jnp.asarray(tokens[..., 1:].reshape(8, 8)))

    want_loss, want = jax.value_and_grad(ref)(jax.tree.map(jnp.asarray, params))
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    got = merge_stages(jax.device_get(grads), logical=False)
    for j in range(1, 4):                                 # replica slots: each slot's gradient sums to its expert's
        moe = got["layers"][j]["moe"]
        p2l = np.arange(10) % 8
        got["layers"][j]["moe"] = {k: (np.stack([np.asarray(v)[p2l == e].sum(0) for e in range(8)])
                                       if k in ("w1", "w2", "w3") else v)
                                   for k, v in moe.items() if k not in ("log2phy", "logcnt")}
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves({k: want[k] for k in got})))
    assert len(pairs) == len(jax.tree.leaves(want))
    assert max(rel_err(a, b) for a, b in pairs) < 1e-4
    reports = fb_stream_reports(tr.lower(tokens).as_text(dialect="hlo", debug_info=True))
    assert reports and all(not r.paths for r in reports), [r.paths[0] for r in reports if r.paths]
    assert any(min(r.collectives["F"], r.collectives["B"], r.compute["F"], r.compute["B"]) > 0 for r in reports)


@pytest.mark.slow
def test_checkpoint_restore_reproduces_the_next_steps_exactly(rng, tmp_path):
    """save() after a step and an EPLB rebalance, two more steps, restore(): the two steps come out bit for bit
    the same (params, Adam state, placement tables, the load window and the step counter all restored)."""
    from seekax.storage.checkpoint import TrainCheckpointer

    cfg, params = load_checkpoint(os.path.join(DATA, "v3_qlora_grouped"), dtype=np.float32, mtp=False,
                                  progress=False)
    batches = [rng.integers(0, cfg.vocab, (2, 2, 9)).astype(np.int32) for _ in range(4)]
    tr = Trainer(params, cfg, TrainConfig(pp=2, ep=2, microbatches=2, microbatch_size=2, lr=1e-3, warmup=2,
                                          clip_norm=1.0, redundant_experts=2, eplb_every=2, eplb_window=3),
                 backend="xla")
    for b in batches[:2]:
        tr.train_step(b)
    assert len(tr.eplb_history) == 1
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        tr.save(ckpt, {"step": 2})
        ckpt.wait()
        first = [tr.train_step(b) for b in batches[2:]]
        assert len(tr.eplb_history) == 2
        assert tr.restore(ckpt) == {"step": 2} and tr.step_count == 2
        again = [tr.train_step(b) for b in batches[2:]]
    assert again == first


@pytest.mark.parametrize("field, value, expected", [
    ("overlap", "yes", "overlap='yes': expected True or False"),
    ("clip_norm", -1.0, "clip_norm=-1.0: expected a number >= 0"),
    ("warmup", -2, "warmup=-2"),
    ("stats_every", 0, "stats_every=0"),
])
def test_train_config_names_the_bad_field(field, value, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})
