"""Write tiny random DeepSeek-V2/V3 checkpoints and transformers' outputs on them into tests/data/models/.

Run with an interpreter that has torch, transformers, safetensors and tokenizers (not seekax's .venv):
    .venv-ref/bin/python scripts/make_model_goldens.py [OUT_DIR] [--only NAME ...]
Each case directory holds a Hugging Face checkpoint in the released layout (config.json, bf16 or FP8
safetensors in two shards with model.safetensors.index.json, tokenizer.json, tokenizer_config.json) and
golden.npz (tokens, float32 logits, chosen experts per MoE layer) plus golden.json (greedy `generate`).
The FP8 case stores e4m3 weights with weight_scale_inv per 128x128 block; its reference runs on the
dequantised weights. Nothing is downloaded: configs, weights and the tokenizer are built here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data", "models")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
                 "{% else %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")
CORPUS = """DeepSeek-V3 is a strong Mixture-of-Experts language model with 671B total parameters, of which 37B are
activated for each token. It adopts Multi-head Latent Attention and DeepSeekMoE architectures. It pioneers an
auxiliary-loss-free strategy for load balancing and sets a multi-token prediction training objective.
The quick brown fox jumps over the lazy dog. JAX is a library for array-oriented numerical computation,
with automatic differentiation and JIT compilation. Hello world! What is the capital of France? Paris.
"""
PROMPTS = ["Hello world", "The quick brown fox", "DeepSeek is"]
MAX_NEW = 8

BASE_V3 = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=320, hidden_size=64,
               intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
               kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16,
               n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=True,
               scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu", max_position_embeddings=256,
               rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
               attention_bias=False, attention_dropout=0.0, num_nextn_predict_layers=0, moe_layer_freq=1,
               initializer_range=0.02, torch_dtype="bfloat16")
BASE_V2 = dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=320, hidden_size=64,
               intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=1.0,
               kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16,
               n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=False,
               scoring_func="softmax", topk_method="greedy", hidden_act="silu", max_position_embeddings=256,
               rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
               attention_bias=False, attention_dropout=0.0, moe_layer_freq=1, initializer_range=0.02,
               torch_dtype="bfloat16")


def cases() -> dict[str, dict]:
    """Tiny configs covering the fields the released configs use, in both spellings."""
    return {
        # q_lora set, grouped sigmoid routing with a correction bias, a dense layer then MoE, MTP weights present.
        "v3_qlora_grouped": dict(BASE_V3, num_nextn_predict_layers=1),
        # no q_lora, YaRN (mscale != mscale_all_dim: cos/sin and softmax both scaled), transformers 5 spelling,
        # RoPE on halves, tied embeddings, no renormalisation, two shared experts, only MoE layers.
        "v3_yarn_tied": {**{k: v for k, v in BASE_V3.items() if k not in ("rope_theta", "rope_scaling")},
                         "q_lora_rank": None, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
                         "num_hidden_layers": 2, "norm_topk_prob": False, "n_shared_experts": 2,
                         "tie_word_embeddings": True, "rope_interleave": False, "max_position_embeddings": 128,
                         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                             "mscale": 1.0, "mscale_all_dim": 0.8}},
        # V2-Lite's shape of config: softmax greedy routing, no q_lora, YaRN in the released spelling.
        "v2_lite": dict(BASE_V2, max_position_embeddings=128,
                        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
        # V2: group-limited greedy routing over softmax scores, q_lora set, scaled weights.
        "v2_group_limited": dict(BASE_V2, q_lora_rank=48, n_group=4, topk_group=2, num_experts_per_tok=3,
                                 topk_method="group_limited_greedy", routed_scaling_factor=2.0),
        # Native FP8 (DeepSeek's layout): every linear weight e4m3 + weight_scale_inv per 128x128 block,
        # kv_a_proj_with_mqa 96 rows (one partial scale row), embeddings, head, norms and router in bf16.
        "v3_fp8": dict(BASE_V3, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=64,
                       q_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=2,
                       num_key_value_heads=2, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
                       num_hidden_layers=2, _head_scale=1.0,
                       quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "weight_block_size": [128, 128]}),
    }


# ----------------------------------------------------------------------------------------------- weights
def hf_tensors(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 weights under the released checkpoints' names (per-expert tensors, MTP modules)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    heads, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
    rope, vh = cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv, ql = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    t = {}

    def mat(name, n_out, n_in, scale=1.0):
        t[name] = (rng.standard_normal((n_out, n_in)) * scale / math.sqrt(n_in)).astype(np.float32)

    def norm(name, n):
        t[name] = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def layer(i):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm.weight", h)
        norm(f"{p}.post_attention_layernorm.weight", h)
        if ql:
            mat(f"{p}.self_attn.q_a_proj.weight", ql, h)
            norm(f"{p}.self_attn.q_a_layernorm.weight", ql)
            mat(f"{p}.self_attn.q_b_proj.weight", heads * (nope + rope), ql)
        else:
            mat(f"{p}.self_attn.q_proj.weight", heads * (nope + rope), h)
        mat(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kv + rope, h)
        norm(f"{p}.self_attn.kv_a_layernorm.weight", kv)
        mat(f"{p}.self_attn.kv_b_proj.weight", heads * (nope + vh), kv)
        mat(f"{p}.self_attn.o_proj.weight", h, heads * vh)
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            mat(f"{p}.mlp.gate_proj.weight", inter, h)
            mat(f"{p}.mlp.up_proj.weight", inter, h)
            mat(f"{p}.mlp.down_proj.weight", h, inter)
            return
        e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        mat(f"{p}.mlp.gate.weight", e, h, 3.0)
        if cfg["model_type"] == "deepseek_v3":
            t[f"{p}.mlp.gate.e_score_correction_bias"] = (0.05 * rng.standard_normal(e)).astype(np.float32)
        for j in range(e):
            mat(f"{p}.mlp.experts.{j}.gate_proj.weight", inter, h)
            mat(f"{p}.mlp.experts.{j}.up_proj.weight", inter, h)
            mat(f"{p}.mlp.experts.{j}.down_proj.weight", h, inter)
        si = inter * cfg["n_shared_experts"]
        mat(f"{p}.mlp.shared_experts.gate_proj.weight", si, h)
        mat(f"{p}.mlp.shared_experts.up_proj.weight", si, h)
        mat(f"{p}.mlp.shared_experts.down_proj.weight", h, si)

    t["model.embed_tokens.weight"] = rng.standard_normal((v, h)).astype(np.float32)
    for i in range(cfg["num_hidden_layers"]):
        layer(i)
    norm("model.norm.weight", h)
    if not cfg["tie_word_embeddings"]:
        mat("lm_head.weight", v, h, cfg.get("_head_scale", 4.0))  # logits of std ~4: greedy choices far from ties
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        i = cfg["num_hidden_layers"] + k
        layer(i)
        norm(f"model.layers.{i}.enorm.weight", h)
        norm(f"model.layers.{i}.hnorm.weight", h)
        mat(f"model.layers.{i}.eh_proj.weight", h, 2 * h)
        norm(f"model.layers.{i}.shared_head.norm.weight", h)
        t[f"model.layers.{i}.embed_tokens.weight"] = t["model.embed_tokens.weight"]
        t[f"model.layers.{i}.shared_head.head.weight"] = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return t


def is_linear(name: str, a: np.ndarray) -> bool:
    return a.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name and "shared_head.head" not in name \
        and not name.endswith("mlp.gate.weight")


def quantize_block(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float32 -> (e4m3 [N, K], scale_inv [ceil(N/128), ceil(K/128)] float32), w ~= q * scale_inv."""
    n, k = w.shape
    nb, kb = -(-n // 128), -(-k // 128)
    padded = np.zeros((nb * 128, kb * 128), np.float32)
    padded[:n, :k] = w
    blocks = padded.reshape(nb, 128, kb, 128)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.maximum(amax, 1e-4) / 448.0
    q = np.clip(blocks / scale[:, None, :, None], -448, 448).reshape(nb * 128, kb * 128)[:n, :k]
    return torch.from_numpy(np.ascontiguousarray(q)).to(torch.float8_e4m3fn), torch.from_numpy(scale.astype(np.float32))


def dequantize_block(q: torch.Tensor, s: torch.Tensor) -> np.ndarray:
    n, k = q.shape
    full = np.repeat(np.repeat(s.numpy(), 128, 0), 128, 1)[:n, :k]
    return q.to(torch.float32).numpy() * full


def write_checkpoint(path: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Two safetensors shards + index, in name order (as the released checkpoints are split)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------------------------- tokenizer
def write_tokenizer(path: str, vocab_limit: int) -> None:
    """A byte-level BPE trained on a few sentences, with a BOS post-processor and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_limit - 4, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "pad_token": EOS, "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
                   "model_max_length": 256}, f, indent=1)


# ----------------------------------------------------------------------------------------------- reference
def reference(path: str, load_dir: str, cfg: dict, seed: int) -> None:
    """transformers' logits, experts and greedy generations on the checkpoint in load_dir (float32)."""
    import transformers
    from tokenizers import Tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(load_dir, dtype=torch.float32)
    model.eval()
    experts = {}

    def hook(i):
        def fn(module, args, out):
            experts.setdefault(i, []).append(out[2].detach().clone())
        return fn

    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(hook(i))
    rng = np.random.default_rng(seed)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tokens = rng.integers(0, tok.get_vocab_size(), size=(2, 11))
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()
    chosen = {f"experts_{i}": np.sort(v[0].numpy().reshape(2, 11, -1), axis=-1) for i, v in experts.items()}
    np.savez_compressed(os.path.join(path, "golden.npz"), tokens=tokens.astype(np.int32), logits=logits, **chosen)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    gens = []
    eos = tok.token_to_id(EOS)
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        assert hf_tok(prompt)["input_ids"] == ids, (prompt, ids, hf_tok(prompt)["input_ids"])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        gens.append({"prompt": prompt, "prompt_ids": ids, "output_ids": out[0, len(ids):].tolist()})
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                      tokenize=False)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "max_new_tokens": MAX_NEW,
            "generate": gens, "chat_hello": chat}
    with open(os.path.join(path, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


def make_case(out: str, name: str, cfg: dict, seed: int) -> None:
    path = os.path.join(out, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    rng = np.random.default_rng(seed)
    raw = hf_tensors(cfg, rng)
    fp8 = "quantization_config" in cfg
    stored, ref = {}, {}
    for n, a in raw.items():
        if fp8 and is_linear(n, a):
            q, s = quantize_block(a)
            stored[n], stored[n + "_scale_inv"] = q, s
            ref[n] = dequantize_block(q, s)
        else:
            stored[n] = torch.from_numpy(a).to(torch.bfloat16)
            ref[n] = stored[n].to(torch.float32).numpy()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    write_checkpoint(path, cfg, stored)
    write_tokenizer(path, cfg["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:      # the reference loads dequantised float32 weights
        ref_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        write_checkpoint(tmp, ref_cfg, {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in ref.items()})
        reference(path, tmp, cfg, seed + 1)
    print(f"{name}: {sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1024:.0f} KiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    for i, (name, cfg) in enumerate(cases().items()):
        if args.only and name not in args.only:
            continue
        make_case(args.out, name, cfg, args.seed * 100 + i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
