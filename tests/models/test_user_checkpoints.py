"""Checkpoint directories as users bring them: written here the way DeepSeek's releases (and tiny random test
models) lay them out, not by `save_checkpoint`: the released config.json field set shrunk to dimensions that
are not multiples of 128, native FP8 with `weight_scale_inv`, the MTP layer, shards named in the index, a
LlamaTokenizerFast-style tokenizer_config.json (AddedToken dicts, DeepSeek's chat template). Bad files are
clear errors naming the file or tensor."""

import json
import os
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from seekax.layers.linear import Fp8Weight
from seekax.models.checkpoint import load_checkpoint
from seekax.models.deepseek import dequantize_params, forward
from seekax.models.deepseek_config import from_hf_config
from seekax.models.tokenizer import Tokenizer
from seekax.testing import calc_diff

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
TEMPLATE = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
            "{% set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message['role'] == "
            "'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{ bos_token }}"
            "{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{{'" + USER +
            "' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' %}{{'" + ASSISTANT +
            "' + message['content'] + '" + EOS + "'}}{%- endif %}{%- endfor -%}{% if add_generation_prompt %}"
            "{{'" + ASSISTANT + "<think>\\n'}}{% endif %}")
V3 = {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
      "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                   "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
      "aux_loss_alpha": 0.001, "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 72,
      "initializer_range": 0.02, "intermediate_size": 200, "kv_lora_rank": 40, "max_position_embeddings": 163840,
      "model_type": "deepseek_v3", "moe_intermediate_size": 56, "moe_layer_freq": 1, "n_group": 2,
      "n_routed_experts": 6, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 3,
      "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 3, "num_nextn_predict_layers": 1,
      "pretraining_tp": 1, "q_lora_rank": 48, "qk_nope_head_dim": 24, "qk_rope_head_dim": 16,
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]},
      "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                              "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                              "type": "yarn"},
      "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
      "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
      "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 24, "vocab_size": 300}
V2_LITE = {**{k: v for k, v in V3.items() if k not in ("quantization_config", "ep_size")},
           "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 64,
           "intermediate_size": 100, "kv_lora_rank": 32, "moe_intermediate_size": 40, "n_group": 1,
           "n_routed_experts": 5, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4,
           "num_experts_per_tok": 3, "num_key_value_heads": 4, "num_nextn_predict_layers": 0, "q_lora_rank": None,
           "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
           "topk_method": "greedy", "v_head_dim": 16}


def _added(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tokenizer(out, *, bos_post_processor=True, template_file=False):
    """DeepSeek's tokenizer files in miniature: LlamaTokenizerFast with add_bos_token, AddedToken dicts."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=[BOS, EOS, USER, ASSISTANT, "<think>", "</think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello world, DeepSeek is a model.", "the quick brown fox jumps over"] * 20, trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 16384,
           "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "clean_up_tokenization_spaces": False,
           "bos_token": _added(BOS), "eos_token": _added(EOS), "pad_token": _added(EOS),
           "use_default_system_prompt": False}
    if template_file:
        with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(TEMPLATE)
    else:
        cfg["chat_template"] = TEMPLATE
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return tok.token_to_id(BOS), tok.token_to_id(EOS)


def _fp8(w):
    """DeepSeek's block FP8: e4m3 values and float32 `weight_scale_inv` per 128x128 block (edges partial)."""
    n, k = w.shape
    s = np.zeros((-(-n // 128), -(-k // 128)), np.float32)
    q = np.zeros_like(w)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            s[i, j] = max(float(np.abs(w[blk]).max()), 1e-12) / 448.0
            q[blk] = w[blk] / s[i, j]
    return q.astype(ml_dtypes.float8_e4m3fn), s


def _layer(t, pre, c, moe, rng, fp8):
    h, heads, ql = c["hidden_size"], c["num_attention_heads"], c.get("q_lora_rank")
    nope, rope, vh, kvl = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    lin = {}
    norm = lambda name, n: t.update({f"{pre}.{name}": np.ones(n, ml_dtypes.bfloat16)})  # noqa: E731

    def w(name, shape):
        lin[f"{pre}.{name}"] = (rng.standard_normal(shape) * 0.05).astype(np.float32)

    norm("input_layernorm.weight", h)
    norm("post_attention_layernorm.weight", h)
    if ql:
        w("self_attn.q_a_proj.weight", (ql, h))
        norm("self_attn.q_a_layernorm.weight", ql)
        w("self_attn.q_b_proj.weight", (heads * (nope + rope), ql))
    else:
        w("self_attn.q_proj.weight", (heads * (nope + rope), h))
    w("self_attn.kv_a_proj_with_mqa.weight", (kvl + rope, h))
    norm("self_attn.kv_a_layernorm.weight", kvl)
    w("self_attn.kv_b_proj.weight", (heads * (nope + vh), kvl))
    w("self_attn.o_proj.weight", (h, heads * vh))
    if moe:
        e, i = c["n_routed_experts"], c["moe_intermediate_size"]
        t[f"{pre}.mlp.gate.weight"] = (rng.standard_normal((e, h)) * 0.05).astype(ml_dtypes.bfloat16)
        if c["model_type"] == "deepseek_v3":
            t[f"{pre}.mlp.gate.e_score_correction_bias"] = (rng.standard_normal(e) * 0.01).astype(np.float32)
        for x in range(e):
            w(f"mlp.experts.{x}.gate_proj.weight", (i, h))
            w(f"mlp.experts.{x}.up_proj.weight", (i, h))
            w(f"mlp.experts.{x}.down_proj.weight", (h, i))
        i *= c["n_shared_experts"]
        prefix = "mlp.shared_experts."
    else:
        i, prefix = c["intermediate_size"], "mlp."
    w(prefix + "gate_proj.weight", (i, h))
    w(prefix + "up_proj.weight", (i, h))
    w(prefix + "down_proj.weight", (h, i))
    for name, a in lin.items():
        if fp8:
            t[name], t[name + "_scale_inv"] = _fp8(a)
        else:
            t[name] = a.astype(ml_dtypes.bfloat16)


def write_user_dir(out, c, *, fp8, shards=3, seed=0, **tok_kw):
    """A directory as released: config.json, shards + index (MTP layer included), tokenizer files."""
    os.makedirs(out, exist_ok=True)
    bos, eos = write_tokenizer(out, **tok_kw)
    c = {**c, "bos_token_id": bos, "eos_token_id": eos}
    rng = np.random.default_rng(seed)
    h, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    t = {"model.embed_tokens.weight": (rng.standard_normal((v, h)) * 0.05).astype(ml_dtypes.bfloat16)}
    for i in range(n):
        _layer(t, f"model.layers.{i}", c, i >= c["first_k_dense_replace"], rng, fp8)
    t["model.norm.weight"] = np.ones(h, ml_dtypes.bfloat16)
    t["lm_head.weight"] = (rng.standard_normal((v, h)) * 0.05).astype(ml_dtypes.bfloat16)
    for k in range(c.get("num_nextn_predict_layers", 0)):
        pre = f"model.layers.{n + k}"
        _layer(t, pre, c, True, rng, fp8)
        t.update({f"{pre}.embed_tokens.weight": t["model.embed_tokens.weight"],
                  f"{pre}.shared_head.head.weight": t["lm_head.weight"],
                  f"{pre}.enorm.weight": np.ones(h, ml_dtypes.bfloat16),
                  f"{pre}.hnorm.weight": np.ones(h, ml_dtypes.bfloat16),
                  f"{pre}.shared_head.norm.weight": np.ones(h, ml_dtypes.bfloat16),
                  f"{pre}.eh_proj.weight": (rng.standard_normal((h, 2 * h)) * 0.05).astype(ml_dtypes.bfloat16)})
    names, weight_map = list(t), {}
    per = -(-len(names) // shards)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:06d}.safetensors"      # V3's own spelling: 000163
        part = {name: np.ascontiguousarray(t[name]) for name in names[s * per:(s + 1) * per]}
        save_file(part, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(a.nbytes for a in t.values())}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return c


@pytest.fixture(scope="module")
def v3_fp8_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_v3") / "v3_fp8"
    write_user_dir(d, V3, fp8=True)
    return str(d)


@pytest.fixture(scope="module")
def v2_lite_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_v2") / "v2_lite"
    write_user_dir(d, V2_LITE, fp8=False, shards=2)
    return str(d)


# ------------------------------------------------------------------------------------------- FP8 at odd dims
def test_native_fp8_checkpoint_with_dims_off_128_loads_and_runs(v3_fp8_dir):
    """A tiny FP8 V3 checkpoint (hidden 72, moe_intermediate 56): the grouped FP8 expert GEMMs need multiples
    of 128, so the MoE layers' weights load dequantised; attention and dense MLPs stay FP8. Logits match the
    fully dequantised model within FP8 activation error, the experts chosen are the same."""
    cfg, params = load_checkpoint(v3_fp8_dir, progress=False)
    assert isinstance(params["layers"][0]["attn"]["wq_a"], Fp8Weight)
    assert isinstance(params["layers"][0]["mlp"]["w1"], Fp8Weight)
    for moe in (params["layers"][1]["moe"], params["mtp"][0]["layer"]["moe"]):
        assert not any(isinstance(moe[k], Fp8Weight) for k in moe)
        assert moe["w1"].shape == (6, 56, 72)
    tokens = np.array([[0, 5, 9, 30, 41, 7]], np.int32)
    fwd = jax.jit(lambda p, t: forward(p, t, cfg, backend="xla"))
    logits, experts = fwd(params, tokens)
    ref, ref_experts = fwd(dequantize_params(params), tokens)
    assert calc_diff(logits, ref) < 1e-3
    np.testing.assert_array_equal(experts[1], ref_experts[1])


def test_generate_command_serves_the_fp8_directory_with_its_chat_template(v3_fp8_dir, capsys):
    from seekax.cli.main import main

    assert main(["generate", "--model", v3_fp8_dir, "--prompt", "Hello world", "--chat", "--max-new-tokens", "3",
                 "--json", "--backend", "xla"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    tok = Tokenizer(v3_fp8_dir)
    assert out["prompt_ids"] == tok.encode(f"{BOS}{USER}Hello world{ASSISTANT}<think>\n", add_special_tokens=False)
    assert len(out["output_ids"]) <= 3


def test_quantize_on_load_keeps_experts_float_at_dims_off_128(v2_lite_dir):
    """`--fp8` on a V2-Lite-shaped bf16 checkpoint (hidden 64): attention FP8, the MoE layers float."""
    cfg, params = load_checkpoint(v2_lite_dir, quantize=True, dtype=np.float32, progress=False)
    assert isinstance(params["layers"][0]["attn"]["wq"], Fp8Weight)
    assert not isinstance(params["layers"][1]["moe"]["w1"], Fp8Weight)
    assert not isinstance(params["layers"][1]["moe"]["shared_w1"], Fp8Weight)
    logits, _ = jax.jit(lambda p, t: forward(p, t, cfg, backend="xla"))(params, np.array([[0, 4, 8]], np.int32))
    assert np.isfinite(np.asarray(logits)).all()


# ------------------------------------------------------------------------------------------- bad files
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst, sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))


def _edit_header(path, edit):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _shrink_first(header):
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 2]


@pytest.mark.parametrize("case, match", [
    ("header_len", r"model-00001-of-000002.safetensors.*header of 1099511627776 bytes.*file of \d+ bytes"),
    ("offsets", r"'model.embed_tokens.weight'.*38398 bytes.*\(300, 64\) BF16 = 38400 bytes"),
    ("truncated", r"model-00002-of-000002.safetensors.*\d+ bytes.*tensor data to byte \d+.*truncated"),
    ("not_a_dict", r"model-00001-of-000002.safetensors.*JSON header"),
])
def test_bad_safetensors_files_are_clear_errors_before_any_read(v2_lite_dir, tmp_path, case, match):
    d, shards = _copy(v2_lite_dir, tmp_path / "bad")
    first = os.path.join(d, shards[0])
    if case == "header_len":
        raw = open(first, "rb").read()
        open(first, "wb").write(struct.pack("<Q", 1 << 40) + raw[8:])
    elif case == "offsets":
        _edit_header(first, _shrink_first)
    elif case == "truncated":
        last = os.path.join(d, shards[1])
        os.truncate(last, os.path.getsize(last) - 100)
    else:
        raw = json.dumps(["not", "a", "header"]).encode()
        open(first, "wb").write(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(d, progress=False)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json", "tokenizer_config.json"])
def test_malformed_json_files_are_named(v2_lite_dir, tmp_path, file):
    d, _ = _copy(v2_lite_dir, tmp_path / "bad")
    with open(os.path.join(d, file), "w") as f:
        f.write('{"vocab_size": 300,')
    with pytest.raises(ValueError, match=f"{file}.*JSON"):
        Tokenizer(d) if file.startswith("tokenizer") else load_checkpoint(d, progress=False)


def test_index_without_a_weight_map_is_named(v2_lite_dir, tmp_path):
    d, _ = _copy(v2_lite_dir, tmp_path / "bad")
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 1}}, f)
    with pytest.raises(ValueError, match="model.safetensors.index.json.*weight_map"):
        load_checkpoint(d, progress=False)


# ------------------------------------------------------------------------------------------- configs
def test_config_fields_that_are_missing_or_null():
    """Null optional fields take transformers' defaults; V2's top-k has no default and is named."""
    cfg = from_hf_config({**V2_LITE, "rms_norm_eps": None, "rope_theta": None, "max_position_embeddings": None,
                          "rope_scaling": None})
    assert (cfg.eps, cfg.mla.rope_theta, cfg.max_position_embeddings) == (1e-6, 10000.0, 4096)
    with pytest.raises(ValueError, match=r"config.json\['num_experts_per_tok'\].*missing"):
        from_hf_config({k: v for k, v in V2_LITE.items() if k != "num_experts_per_tok"})


# ------------------------------------------------------------------------------------------- tokenizers
def test_llama_tokenizer_fast_adds_bos_when_tokenizer_json_does_not(tmp_path):
    """DeepSeek's tokenizer_config says LlamaTokenizerFast with add_bos_token: transformers adds BOS even when
    tokenizer.json's post-processor does not; so does seekax (once: the chat template's BOS is not doubled)."""
    bos, _ = write_tokenizer(tmp_path, bos_post_processor=False)
    tok = Tokenizer(tmp_path)
    ids = tok.encode("Hello world")
    assert ids[0] == bos and ids[1:] == tok.encode("Hello world", add_special_tokens=False)
    chat = tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert chat.count(bos) == 1 and chat[0] == bos
    assert Tokenizer(tmp_path).encode("") == [bos]
    os.makedirs(tmp_path / "own")
    bos, _ = write_tokenizer(tmp_path / "own", bos_post_processor=True)               # tokenizer.json adds it
    assert Tokenizer(tmp_path / "own").encode("Hello world").count(bos) == 1


def test_chat_template_from_its_own_file_and_the_named_list_form(tmp_path):
    """transformers >= 4.47 saves the template as chat_template.jinja; older files may hold a list of named
    templates (the "default" one is used)."""
    write_tokenizer(tmp_path, template_file=True)
    text = Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == f"{BOS}{USER}Hi{ASSISTANT}<think>\n"
    os.remove(tmp_path / "chat_template.jinja")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": TEMPLATE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "Hi"}]) == text
