"""Demo serving: the trained model, saved as a Hugging Face directory and reloaded from it, served through
`seekax generate`'s code path (`DirectoryGenerator`: tokenizer.json, continuous batching over paged latent
caches, prefix reuse through a `KVPageStore`), and checked against the model's full forward."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np


def greedy_matches_forward(params: dict, cfg, prompts: list[list[int]], outputs: list[list[int]]) -> tuple[bool, float]:
    """Every greedy token is the argmax of the full forward (no cache) over prompt + the tokens before it:
    what paged prefill and decode must reproduce. Returns (all equal, the smallest top-1 margin seen, so a
    near-tie that could flip by rounding is visible)."""
    from seekax.models.deepseek import forward

    seqs = [p + out[:-1] for p, out in zip(prompts, outputs)]
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)      # right padding: causal, earlier rows unchanged
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    logits = np.asarray(forward(params, jnp.asarray(batch), cfg, backend="xla")[0], np.float64)
    ok, margin = True, float("inf")
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        row = logits[i, len(p) - 1:len(p) - 1 + len(out)]                               # [len(out), V]
        ok &= bool((row.argmax(-1) == np.asarray(out)).all())
        top2 = np.sort(row, axis=-1)[:, -2:]
        margin = min(margin, float((top2[:, 1] - top2[:, 0]).min()))
    return ok, margin


def serve(model_dir: Path, kv_dir: Path, prompts: list[str], gen: int, say) -> dict:
    """Two rounds of the same requests: the first misses the KV store and fills it, the second reuses the
    whole prompt pages. Both rounds are checked against the full forward."""
    from seekax.models.generate import DirectoryGenerator, SamplingConfig

    shutil.rmtree(kv_dir, ignore_errors=True)
    g = DirectoryGenerator(model_dir, quantize=True, kv_store=kv_dir, max_batch=len(prompts))
    try:
        ids = g.encode(prompts)
        say(f"[serve] {model_dir}: batch of {len(ids)} requests, prompts of {min(map(len, ids))}-"
            f"{max(map(len, ids))} tokens, generating {gen} each")
        sampling = SamplingConfig(max_new_tokens=gen)
        first = g.generate(ids, sampling)
        second = g.generate(ids, sampling)
        stats = g.kv.stats()
        ok1, m1 = greedy_matches_forward(g.params, g.cfg, ids, first.output_ids)
        ok2, m2 = greedy_matches_forward(g.params, g.cfg, ids, second.output_ids)
        for p, out in list(zip(prompts, first.output_ids))[:4]:
            say(f"   ...{p[-40:]!r} -> {g.decode(out)!r}")
    finally:
        g.close()
    return {
        "decode_tokens_per_s": second.tokens_per_s,
        "prompt_tokens_reused_miss_then_hit": [first.prefix_tokens_reused, second.prefix_tokens_reused],
        "kv_prefix_tokens_reused": second.prefix_tokens_reused,
        "kv_page_hit_rate": stats["hits"] / max(stats["hits"] + stats["misses"], 1),
        "decode_equals_full_forward": ok1 and ok2 and first.output_ids == second.output_ids,
        "decode_min_top1_margin": min(m1, m2),
    }
