"""Hugging Face checkpoint loading and saving: clear errors before any data is read, save -> load round
trips (float and FP8), quantisation on load, EP slicing of the experts."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from seekax.layers.linear import Fp8Weight
from seekax.models.checkpoint import load_checkpoint, save_checkpoint
from seekax.models.deepseek import dequantize_params, forward
from seekax.models.safetensors_dir import SafetensorsDir
from seekax.testing import calc_diff, rel_err

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "models")


def _rewrite(src, dst, edit):
    """Copy a checkpoint dir, with edit(tensors: dict) applied to its tensors (one shard + index)."""
    shutil.copytree(src, dst)
    with SafetensorsDir(src) as st:
        tensors = {n: st.read(n) for n in st.tensors}
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(dst, f))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: "model.safetensors" for n in tensors}}, f)


def _leaves_equal(a, b):
    fa, ta = jax.tree.flatten(a)
    fb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32))


L1 = "model.layers.1"


@pytest.mark.parametrize("name, edit, match", [
    ("v3_qlora_grouped", lambda t: t.pop(f"{L1}.mlp.experts.3.up_proj.weight"),
     r"model.layers.1.mlp.experts.3.up_proj.weight'.*missing"),
    ("v3_qlora_grouped", lambda t: t.update({f"{L1}.self_attn.kv_b_proj.weight": np.zeros((10, 32), np.float32)}),
     r"kv_b_proj.weight' shape.*\(10, 32\).*\(128, 32\)"),
    ("v3_qlora_grouped", lambda t: t.update({"model.norm.weight": np.zeros(64, np.int32)}),
     r"'model.norm.weight' dtype.*I32"),
    ("v3_qlora_grouped", lambda t: t.update({"model.norm.weight": np.zeros(64, "float8_e4m3fn")}),
     r"'model.norm.weight' dtype.*F8_E4M3.*only linear weights"),
    ("v3_fp8", lambda t: t.update({f"{L1}.self_attn.kv_a_proj_with_mqa.weight_scale_inv": np.ones((2, 1), np.float32)}),
     r"kv_a_proj_with_mqa.weight_scale_inv' shape.*\(2, 1\).*\(1, 1\).*128x128 block"),
    ("v3_fp8", lambda t: t.pop(f"{L1}.mlp.shared_experts.down_proj.weight_scale_inv"),
     r"shared_experts.down_proj.weight_scale_inv'.*missing.*float32 scales"),
])
def test_bad_checkpoints_name_the_tensor(tmp_path, name, edit, match):
    bad = tmp_path / "bad"
    _rewrite(os.path.join(DATA, name), bad, edit)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(bad, progress=False)


def test_unknown_model_type_and_missing_shard(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(os.path.join(DATA, "v2_lite"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    with pytest.raises(ValueError, match="model_type.*mixtral"):
        load_checkpoint(d, progress=False)
    (d / "config.json").write_text(json.dumps(cfg))
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(d, progress=False)


@pytest.mark.parametrize("name", ["v3_qlora_grouped", "v3_fp8"])
def test_save_then_load_round_trips_the_same_layout(tmp_path, name):
    src = os.path.join(DATA, name)
    cfg, params = load_checkpoint(src, progress=False)
    save_checkpoint(params, cfg, tmp_path / "out", shard_bytes=200_000, progress=False)
    with SafetensorsDir(src) as a, SafetensorsDir(tmp_path / "out") as b:
        assert set(a.tensors) == set(b.tensors)                         # MTP copies and scales included
        for n in a.tensors:
            assert (a.tensors[n].dtype, a.tensors[n].shape) == (b.tensors[n].dtype, b.tensors[n].shape), n
            np.testing.assert_array_equal(a.read(n).astype(np.float32), b.read(n).astype(np.float32), err_msg=n)
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) > 1
    cfg2, params2 = load_checkpoint(tmp_path / "out", progress=False)
    assert cfg2 == cfg and cfg2.hf.get("quantization_config") == cfg.hf.get("quantization_config")
    _leaves_equal(params, params2)


def test_bf16_checkpoint_quantised_on_load_runs_fp8_gemms(tmp_path):
    """A float checkpoint with FP8-friendly dims (the FP8 case's weights, dequantised and saved as float32)
    quantised on load: every linear weight FP8 again, logits within FP8 tolerance of the float model."""
    cfg, params = load_checkpoint(os.path.join(DATA, "v3_fp8"), progress=False)
    deq = jax.tree.map(lambda a: np.asarray(a, np.float32), dequantize_params(params))
    save_checkpoint(deq, cfg, tmp_path / "f32", progress=False)
    cfg32, p32 = load_checkpoint(tmp_path / "f32", progress=False)
    assert "quantization_config" not in cfg32.hf and cfg32.fp8_block is None
    _, pq = load_checkpoint(tmp_path / "f32", quantize=True, dtype=np.float32, progress=False)
    assert isinstance(pq["layers"][0]["attn"]["wq_a"], Fp8Weight)
    assert isinstance(pq["layers"][1]["moe"]["w2"], Fp8Weight)
    np.testing.assert_array_equal(np.asarray(pq["layers"][0]["attn"]["wq_a"].weight).astype(np.float32),
                                  np.asarray(params["layers"][0]["attn"]["wq_a"].weight).astype(np.float32))
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    fwd = jax.jit(lambda p, t: forward(p, t, cfg32, backend="xla")[0])
    ref, got = fwd(p32, tokens), fwd(pq, tokens)
    assert calc_diff(got, ref) < 1e-3 and rel_err(got, ref) < 0.1


def test_ep_rank_reads_only_its_experts():
    src = os.path.join(DATA, "v3_qlora_grouped")
    _, full = load_checkpoint(src, progress=False)
    _, part = load_checkpoint(src, ep_rank=1, ep_size=4, progress=False)
    for name in ("w1", "w2", "w3"):
        np.testing.assert_array_equal(part["layers"][1]["moe"][name], full["layers"][1]["moe"][name][2:4])
    np.testing.assert_array_equal(part["layers"][1]["moe"]["gate"], full["layers"][1]["moe"]["gate"])


def test_load_to_a_mesh_places_each_ep_ranks_experts():
    from jax.sharding import PartitionSpec as P

    from seekax.models.checkpoint import load_checkpoint_to_mesh

    src = os.path.join(DATA, "v3_fp8")
    _, full = load_checkpoint(src, progress=False)
    mesh = jax.make_mesh((2, 2), ("dp", "ep"))
    _, placed = load_checkpoint_to_mesh(src, mesh, progress=False)
    w1 = placed["layers"][1]["moe"]["w1"]
    assert isinstance(w1, Fp8Weight) and w1.weight.sharding.spec == P("ep")
    assert w1.weight.addressable_shards[0].data.shape == (2, 128, 128)          # 4 experts / ep 2
    assert placed["embed"].sharding.spec == P()
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(placed)):
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))
    with pytest.raises(ValueError, match="ep_axis"):
        load_checkpoint_to_mesh(src, mesh, ep_axis="tp", progress=False)
