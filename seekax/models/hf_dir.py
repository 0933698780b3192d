"""Write a new Hugging Face model directory: a DeepSeek config, random (or given) params, and a byte-level
BPE tokenizer trained on texts with the `tokenizers` library (BOS post-processor, chat template). For demos
and tests that need a complete directory without downloading one."""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax

from seekax.models.checkpoint import save_checkpoint
from seekax.models.deepseek import init_params
from seekax.models.deepseek_config import DeepseekConfig, from_hf_config

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
                 "{% else %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")


def write_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str], vocab_size: int) -> dict[str, int]:
    """Train a byte-level BPE of at most vocab_size tokens (4 of them special) on texts; write tokenizer.json
    and tokenizer_config.json. Returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "pad_token": EOS, "chat_template": CHAT_TEMPLATE}, f, indent=1, ensure_ascii=False)
    return {"bos": bos, "eos": tok.token_to_id(EOS), "vocab": tok.get_vocab_size()}


def write_model_dir(out_dir: str | os.PathLike, hf_config: dict, texts: Iterable[str], *, params: dict | None = None,
                    seed: int = 0) -> tuple[DeepseekConfig, dict]:
    """A complete directory (config.json with the tokenizer's BOS/EOS ids, safetensors, tokenizer files) for
    `hf_config` (a config.json dict; vocab_size bounds the tokenizer). params default to `init_params`.
    Returns (config, params)."""
    ids = write_tokenizer(out_dir, texts, int(hf_config["vocab_size"]))
    cfg = from_hf_config({**hf_config, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"]})
    params = init_params(jax.random.key(seed), cfg) if params is None else params
    save_checkpoint(params, cfg, out_dir, progress=False)
    return cfg, params
