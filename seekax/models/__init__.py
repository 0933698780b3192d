"""Whole models built from seekax's layers.

DeepSeek-V2/V3 from Hugging Face directories (docs/models.md): `deepseek_config` (config.json), `deepseek`
(params, forward, serving step), `checkpoint` (safetensors load/save, native FP8), `tokenizer`, `generate`
(continuous batching), `train` (pipeline x expert parallel fine-tuning), `hf_dir` (write a new directory).
`tiny`: the demo's small DeepSeek-V3-style model.
"""
