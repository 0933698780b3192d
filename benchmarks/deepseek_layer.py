"""One decode step of a DeepSeek-V3-shaped MoE layer, one expert-parallel rank's share (EP = 8: 32 routed
experts), native FP8 weights, bf16 latent cache of 64-token pages: tokens/s and the fraction of the HBM
floor reached, where the floor is the bytes the step must read (its FP8 weights, scales, router and norms,
and its sequences' cached latents) over the H200's measured copy bandwidth.

The whole step runs: RMSNorm, MLA (FP8 projections, absorbed W_UK, the FlashMLA-style decode kernel with
split-KV combine, W_UV, FP8 o_proj), RMSNorm, routing, the grouped FP8 expert GEMMs and the shared expert.
On one GPU the dispatch has no peers (ep = 1 inside the step), so the row is the compute and memory part of
a rank's step, without the all-to-all. `err` is the Mosaic step against the same step on XLA (calc_diff).
On a CPU (`--quick`) a scaled-down layer runs on XLA only, to exercise the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_time, emit, parser, save_partial  # noqa: E402

from seekax.ir import H200  # noqa: E402
from seekax.ir.device import is_hopper  # noqa: E402
from seekax.layers.linear import Fp8Weight  # noqa: E402
from seekax.layers.mla import PagedLatentCache  # noqa: E402
from seekax.models.deepseek import layer_step  # noqa: E402
from seekax.models.v3_layer_example import DecodeStepShape, layer_param_shapes, step_bytes, v3_config  # noqa: E402
from seekax.testing import calc_diff  # noqa: E402


def random_params(cfg, local_experts, key):
    shapes = layer_param_shapes(cfg, local_experts)
    keys = iter(jax.random.split(key, 64))

    def draw(leaf):
        if isinstance(leaf, Fp8Weight):
            w = jax.random.normal(next(keys), leaf.shape, jnp.bfloat16) / (leaf.shape[-1] ** 0.5)
            return jax.jit(Fp8Weight.quantize)(w)
        if leaf.dtype == jnp.bfloat16:
            return jnp.ones(leaf.shape, leaf.dtype)
        return jax.random.normal(next(keys), leaf.shape, leaf.dtype) * (0.05 if leaf.ndim > 1 else 0.01)

    return jax.tree.map(draw, shapes, is_leaf=lambda x: isinstance(x, Fp8Weight))


def make_cache(b, seq, latent, dtype):
    n = b * (seq // 64 + 1)
    pages = jax.random.normal(jax.random.key(1), (n, 64, 1, latent), dtype)
    table = jnp.arange(n, dtype=jnp.int32).reshape(b, -1)
    return PagedLatentCache(pages=pages, block_table=table, seq_lens=jnp.full((b,), seq - 1, jnp.int32),
                            free=jnp.zeros((n,), bool))


def main() -> None:
    args = parser(__doc__).parse_args()
    gpu = is_hopper()
    if gpu:
        cfg = v3_config(n_routed_experts=32)
        runs = [(b, seq) for b in (16, 64, 128) for seq in (4096,)]
        backends, dtype = ("mosaic", "xla"), jnp.bfloat16
    else:
        cfg = v3_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
                        moe_intermediate_size=128, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
        runs, backends, dtype = [(4, 256)], ("xla",), jnp.float32
    params = random_params(cfg, cfg.moe.num_experts, jax.random.key(0))
    timing = {} if gpu else {"iters": 1, "warmup": 1}
    rows = []
    for b, seq in runs:
        shape = DecodeStepShape(batch=b, seq_len=seq, ep=1)
        cache = make_cache(b, seq, cfg.mla.latent_dim, dtype)
        h = jax.random.normal(jax.random.key(2), (b, 1, cfg.hidden), dtype)
        nbytes = step_bytes(cfg, shape)
        floor = (nbytes["weights"] + nbytes["cache"]) / H200.hbm_bandwidth
        row = {"batch": b, "seq_len": seq, "weights_MB": nbytes["weights"] / 1e6, "cache_MB": nbytes["cache"] / 1e6}
        outs = {}
        for backend in backends:
            step = jax.jit(lambda p, h, c, backend=backend: layer_step(p, h, c, cfg, cfg.first_k_dense, mode="decode",
                                                                       backend=backend)[0])
            try:
                t = device_time(step, params, h, cache, **timing)
                outs[backend] = step(params, h, cache)
                row[f"{backend}_us"] = t * 1e6
                row[f"{backend}_tokens_per_s"] = b / t
                row[f"{backend}_floor_frac"] = floor / t
            except Exception as e:  # noqa: BLE001 - one failing backend must not hide the other's numbers
                row[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if "mosaic" in outs and "xla" in outs:
            row["err"] = calc_diff(outs["mosaic"].astype(jnp.float32), outs["xla"].astype(jnp.float32))
        print(row, flush=True)
        rows.append(row)
        save_partial("deepseek_layer", rows, args.json)
    emit("deepseek_layer", rows, args.json)


if __name__ == "__main__":
    main()
