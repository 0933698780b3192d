"""MLA decode (FlashMLA's benchmark shapes): the Mosaic GPU kernel vs the XLA reference in the same run.

Reports GB/s and TFLOPS against the bytes/flops a decode step must move/do (`MlaDecodeSpec`), the
fraction of the H200 roofline floor reached, and the speedup over the XLA reference. Lengths vary
around the mean as FlashMLA's test does (normal, std = mean / 2, clipped). The split metadata is
computed once per step outside the timed call, as a serving engine shares it across layers.
Timing (`common.device_time`): CUPTI kernel time on a GPU (the KV cache is far larger than L2), wall time on
a CPU. `err_out`/`err_lse`: the kernel against the XLA reference (a hardware correctness check).
Rows with `h_kv` > 1 (FlashMLA's several KV heads) read h_kv latent rows per token, each by its own query heads.
On a GPU also DeepSeek-V3.2's FP8 cache (656 bytes per token instead of 1152): `fp8_*` columns, the FP8 kernel's
GB/s of its own bytes, its speedup over the bf16 kernel and over XLA's dequantise-then-attend path, its error
against that path. Sparse (top-k) decode, DeepSeek-V3.2's shapes (top-2048 per query token): `sparse` rows,
the kernel against XLA's gather-then-attend, GB/s of the gathered rows and TFLOPS; `fp8_*` the same over the
FP8 cache (656 bytes per gathered token), with its speedup over the bf16 sparse kernel.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_time, emit, parser, rel_err, save_partial  # noqa: E402

from seekax.ir import H200, MlaDecodeSpec  # noqa: E402
from seekax.ir.device import is_hopper  # noqa: E402
from seekax.lowering.backend import num_sms_for  # noqa: E402
from seekax.lowering.reference.mla_decode import quantize_fp8_latent  # noqa: E402
from seekax.ops.mla import (mla_decode, mla_decode_fp8, mla_decode_sparse, mla_decode_sparse_fp8,  # noqa: E402
                                mla_metadata)


def make_inputs(rng, b, mean_sk, h, s_q, page=64, kv_heads=1):
    lens = np.clip(rng.normal(mean_sk, mean_sk / 2, size=b), s_q, 2 * mean_sk).astype(np.int32)
    need = -(-lens // page)
    max_pages = int(need.max())
    perm = rng.permutation(int(need.sum())).astype(np.int32)
    table = np.zeros((b, max_pages), np.int32)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[at:at + n]
        at += n
    key_q, key_kv = jax.random.split(jax.random.key(b * 7 + mean_sk + h + s_q))
    q = jax.random.normal(key_q, (b, s_q, h, 576), jnp.bfloat16)
    kv = jax.random.normal(key_kv, (int(need.sum()), page, kv_heads, 576), jnp.bfloat16)
    return q, kv, jnp.asarray(table), jnp.asarray(lens)


def kernel_columns(q, kv, table, lens, spec, t_xla, xla, backend: str, timing: dict) -> tuple[dict, object]:
    """The bf16 kernel: time, GB/s, TFLOPS, fraction of the floor, speedup and error vs XLA."""
    b, s_q, h, _ = q.shape
    meta = jax.jit(functools.partial(mla_metadata, num_sms=num_sms_for(backend), q_len=s_q, num_heads=h,
                                     kv_heads=kv.shape[2]))(lens)
    run = functools.partial(jax.jit(lambda *a, metadata: mla_decode(*a, metadata=metadata, backend=backend)),
                            metadata=meta)
    t = device_time(run, q, kv, table, lens, **timing)
    (out, lse), (rout, rlse) = run(q, kv, table, lens), xla(q, kv, table, lens)
    return dict(mosaic_us=t * 1e6, gbps=spec.min_bytes() / t / 1e9, tflops=spec.flops() / t / 1e12,
                frac_of_floor=spec.floor_seconds(H200) / t, speedup_vs_xla=t_xla / t,
                err_out=rel_err(out, rout), err_lse=rel_err(lse, rlse)), (meta, t)


def fp8_columns(q, cache, table, lens, spec, meta, t_bf16, backend: str, timing: dict) -> dict:
    """The FP8-cache kernel vs the bf16 kernel and XLA's dequantise-then-attend path."""
    b, s_q, h, _ = q.shape
    spec8 = MlaDecodeSpec(batch=b, seq_len=spec.seq_len, q_len=s_q, q_heads=h, kv_heads=spec.kv_heads,
                          kv_dtype="float8_e4m3fn")
    xla8 = jax.jit(functools.partial(mla_decode_fp8, backend="xla"))
    run8 = functools.partial(jax.jit(lambda *a, metadata: mla_decode_fp8(*a, metadata=metadata, backend=backend)),
                             metadata=meta)
    t8 = device_time(run8, q, *cache, table, lens, **timing)
    t8_xla = device_time(xla8, q, *cache, table, lens, **timing)
    return dict(fp8_us=t8 * 1e6, fp8_gbps=spec8.min_bytes() / t8 / 1e9, fp8_speedup_vs_bf16=t_bf16 / t8,
                fp8_speedup_vs_xla=t8_xla / t8,
                fp8_err_out=rel_err(run8(q, *cache, table, lens)[0], xla8(q, *cache, table, lens)[0]))


def sparse_row(rng, b, topk, h, s_q, backend, timing: dict, cache_tokens: int = 4096) -> dict:
    """Top-k decode: each query token picks `topk` of its sequence's `cache_tokens` tokens (a per-sequence
    slice of one shared cache). Bytes and flops: those of dense decode with one sequence of `topk` tokens per
    query token (the gathered rows, q, out, lse; QK^T and P V), for each cache's bytes per token."""
    pages = b * cache_tokens // 64
    key_q, key_kv = jax.random.split(jax.random.key(b + topk + h + s_q))
    q = jax.random.normal(key_q, (b, s_q, h, 576), jnp.bfloat16)
    kv = jax.random.normal(key_kv, (pages, 64, 1, 576), jnp.bfloat16)
    base = (np.arange(b) * cache_tokens)[:, None, None]
    idx = jnp.asarray(base + np.stack([np.stack([rng.choice(cache_tokens, topk, replace=False) for _ in range(s_q)])
                                       for _ in range(b)]), jnp.int32)
    spec, spec8 = (MlaDecodeSpec(batch=b * s_q, seq_len=topk, q_len=1, q_heads=h, kv_dtype=d)
                   for d in ("bfloat16", "float8_e4m3fn"))
    xla = jax.jit(functools.partial(mla_decode_sparse, backend="xla"))
    t_xla = device_time(xla, q, kv, idx, **timing)
    row = {"sparse": True, "b": b, "topk": topk, "h": h, "s_q": s_q, "xla_us": t_xla * 1e6}
    if backend:
        try:
            run = jax.jit(functools.partial(mla_decode_sparse, backend=backend))
            t = device_time(run, q, kv, idx, **timing)
            (out, lse), (rout, rlse) = run(q, kv, idx), xla(q, kv, idx)
            row.update(mosaic_us=t * 1e6, gbps=spec.min_bytes() / t / 1e9, tflops=spec.flops() / t / 1e12,
                       speedup_vs_xla=t_xla / t, err_out=rel_err(out, rout), err_lse=rel_err(lse, rlse))
            cache = jax.jit(quantize_fp8_latent)(kv)
            del kv                                                            # room for the fp8 copies
            xla8 = jax.jit(functools.partial(mla_decode_sparse_fp8, backend="xla"))
            run8 = jax.jit(functools.partial(mla_decode_sparse_fp8, backend=backend))
            t8, t8_xla = device_time(run8, q, *cache, idx, **timing), device_time(xla8, q, *cache, idx, **timing)
            err8 = rel_err(run8(q, *cache, idx)[0], xla8(q, *cache, idx)[0])
            row.update(fp8_us=t8 * 1e6, fp8_gbps=spec8.min_bytes() / t8 / 1e9, fp8_speedup_vs_bf16=t / t8,
                       fp8_speedup_vs_xla=t8_xla / t8, fp8_err_out=err8)
        except Exception as e:  # noqa: BLE001 - keep the other rows
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def main() -> None:
    args = parser(__doc__).parse_args()
    gpu = is_hopper()
    # The kernels run on Hopper; a CPU --quick run drives the same code through the interpreter (one tiny
    # shape, one timed call) so the GPU-only columns are exercised before a lease is spent on them.
    backend = "mosaic" if gpu else ("interpret" if args.quick else None)
    if args.quick or not gpu:
        shapes = [(4, 256, 16, 1), (4, 256, 16, 2), (4, 256, 16, 1, 2)]
    else:
        # FlashMLA's grid, the two target regimes first (a time limit keeps what finished): memory-bound
        # (16 heads, s_q 1) and compute-bound (128 heads, s_q 2), then several KV heads (FlashMLA's h_kv: 2 x 64
        # query heads, a full row tile each; 8 x 16, a quarter of one), then the rest.
        first = [(128, 4096, 16, 1), (128, 4096, 128, 2), (128, 4096, 128, 1, 2), (128, 4096, 128, 1, 8),
                 (128, 8192, 128, 1), (128, 8192, 16, 2)]
        shapes = first + [(128, sk, h, s_q) for sk in (4096, 8192) for h in (16, 32, 64, 128) for s_q in (1, 2)
                          if (128, sk, h, s_q) not in first]
    timing = {} if gpu else {"iters": 1, "warmup": 0}
    rng = np.random.default_rng(0)
    rows = []
    for i, (b, mean_sk, h, s_q, *kv_heads) in enumerate(shapes):
        h_kv = kv_heads[0] if kv_heads else 1
        q, kv, table, lens = make_inputs(rng, b, mean_sk, h, s_q, kv_heads=h_kv)
        spec = MlaDecodeSpec(batch=b, seq_len=int(np.asarray(lens).mean()), q_len=s_q, q_heads=h, kv_heads=h_kv)
        xla = jax.jit(functools.partial(mla_decode, backend="xla"))
        t_xla = device_time(xla, q, kv, table, lens, iters=5 if not gpu else 10)
        row = {"b": b, "s_k": mean_sk, "h": h, "h_kv": h_kv, "s_q": s_q, "xla_us": t_xla * 1e6,
               "xla_gbps": spec.min_bytes() / t_xla / 1e9}
        if backend and (gpu or i == 0):
            try:
                cols, (meta, t) = kernel_columns(q, kv, table, lens, spec, t_xla, xla, backend, timing)
                row.update(cols)
                cache = jax.jit(quantize_fp8_latent)(kv)
                del kv                                                        # room for the fp8 copies
                row.update(fp8_columns(q, cache, table, lens, spec, meta, t, backend, timing))
            except Exception as e:  # noqa: BLE001 - one failing shape must not hide the others' numbers
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(row, flush=True)
        rows.append(row)
        save_partial("mla_decode", rows, args.json)
        if i == min(1, len(shapes) - 1):  # sparse decode after the two target regimes (a time limit may cut the rest)
            sparse = [(2, 128, 16, 1)] if not gpu else [(128, 2048, 128, 1), (128, 2048, 64, 2)]
            for b_, topk, h_, s_q_ in sparse:
                srow = sparse_row(rng, b_, topk, h_, s_q_, backend, timing, cache_tokens=256 if not gpu else 4096)
                print(srow, flush=True)
                rows.append(srow)
                save_partial("mla_decode", rows, args.json)
    emit("mla_decode", rows, args.json)


if __name__ == "__main__":
    main()
