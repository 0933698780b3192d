"""`seekax generate`: text from a Hugging Face DeepSeek-V2/V3 directory (config.json, safetensors, tokenizer.json).

Prompts are encoded the way the directory's tokenizer.json encodes them (its own post-processor, e.g. BOS);
with --chat each prompt becomes one user message rendered by the chat template. Several --prompt flags run
as one continuously batched job over paged latent caches (greedy unless --temperature > 0). --kv-store DIR
reuses whole prompt pages across requests and runs. Text goes to stdout (with --json one object a line:
prompt_ids, output_ids, text); the timing line (tokens/s) goes to stderr.
"""

from __future__ import annotations

import json
import sys

PARAMS = {"max_new_tokens": "max_new_tokens", "model_dir": "model", "top_p": "top_p", "max_batch": "max_batch",
          "prompts": "prompt"}


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a Hugging Face DeepSeek checkpoint directory",
                       description=__doc__, params=PARAMS)
    p.add_argument("--model", required=True, help="checkpoint directory: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (at most)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="apply the directory's chat template to each prompt")
    p.add_argument("--json", action="store_true", help="one JSON object a prompt: prompt_ids, output_ids, text")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded at once (continuous batching)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and activations (auto: float32 on CPU, bfloat16 on GPU); FP8 weights stay FP8")
    p.add_argument("--fp8", action="store_true", help="quantise a float checkpoint's linear weights to FP8 on load")
    p.add_argument("--kv-store", default=None, help="a KV page store folder for prompt-prefix reuse")
    p.add_argument("--backend", choices=("auto", "xla", "mosaic", "interpret"), default="auto",
                   help="kernel backend of the ops")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekax.ir.validate import fail
    from seekax.models.generate import DirectoryGenerator, SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    gen = DirectoryGenerator(args.model, dtype=args.dtype, quantize=args.fp8, kv_store=args.kv_store,
                             max_batch=args.max_batch, backend=args.backend, progress=sys.stderr.isatty())
    try:
        prompts = gen.encode(args.prompt, chat=args.chat)
        for text, ids in zip(args.prompt, prompts):
            if not ids:                                     # "" with a tokenizer that adds no BOS
                raise fail("prompt", text, "text that encodes to at least one token (this tokenizer adds no BOS)")
        result = gen.generate(prompts, sampling)
    finally:
        gen.close()
    for ids, out in zip(prompts, result.output_ids):
        text = gen.decode(out)
        if args.json:
            print(json.dumps({"prompt_ids": ids, "output_ids": out, "text": text}, ensure_ascii=False))
        else:
            print(text)
    print(f"seekax generate: {result.new_tokens} tokens for {len(prompts)} prompts in {result.seconds:.2f} s "
          f"({result.tokens_per_s:.1f} tokens/s, compilation included; {result.prefix_tokens_reused} prompt "
          f"tokens from the KV store)", file=sys.stderr)
    return 0
