"""FP8 GEMMs (DeepGEMM's table shapes): TFLOPS, fraction of the roofline floor, and ratios against baselines
run in the same process: XLA dequantise + bf16 dot (dense), `jax.lax.ragged_dot` bf16 (grouped).
Rows include DeepGEMM's dgrad K = 576 and 2112 (not multiples of 128), decode M = 1..64 (the small-M
kernel where it applies; `tile` shows which kernel and tiles ran), and `train_vjp`: training MoE experts,
`grouped_fp8_linear`'s forward + both gradients against a bf16 ragged_dot's.

Timing (`common.cold_l2_time`): on a GPU the device time of every kernel launched by one call (CUPTI, Mosaic
GPU's profiler), median of 10 calls, with the L2 cache cold (small shapes run over rotated copies of their
inputs, as DeepGEMM's benchmark flushes L2); on a CPU (`--quick`, xla backend only) median wall time.
`err_vs_baseline`: relative error of the op against the baseline's result (a hardware correctness check;
both round to bf16, so ~1e-3 is expected).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cold_l2_time, emit, parser, rel_err, save_partial  # noqa: E402

from seekax.ir.device import H200, is_hopper  # noqa: E402
from seekax.ir.fp8_tiling import Fp8SwapAbConfig  # noqa: E402
from seekax.ir.gemm import GemmSpec, GroupedGemmSpec  # noqa: E402
from seekax.ops import fp8  # noqa: E402

NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE = [(m, n, k) for m in (4096, 64, 128) for n, k in NK]   # large M first: ordered for a timed GPU run
K_TAIL = [(4096, 7168, 576), (4096, 7168, 2112)]              # DeepGEMM's dgrad K: not multiples of 128
SMALL_M = [(m, n, k) for n, k in ((7168, 2048), (2112, 7168)) for m in (1, 8, 16, 32)]   # decode; M = 64 in DENSE
CONTIGUOUS = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]
MASKED = [(g, m, n, k) for g, m in ((1, 1024), (2, 512), (4, 256)) for n, k in ((4096, 7168), (7168, 2048))]
QUANTIZE = [(4096, 7168), (32768, 7168), (4096, 2048)]
TRAIN = [(8, 1024, 2048, 7168), (8, 1024, 7168, 2048)]      # one rank's 8 experts, up and down projections
QUICK_DENSE, QUICK_QUANTIZE = [(64, 256, 256), (128, 512, 384), (64, 256, 576), (8, 512, 256)], [(256, 512)]
QUICK_CONTIGUOUS, QUICK_MASKED, QUICK_TRAIN = [(2, 128, 256, 256)], [(2, 64, 256, 256)], [(2, 128, 256, 256)]


def _quant(key, shape, block, scale=1.0):
    """e4m3 operand with exactly shape[-1] columns (quantize_fp8 pads K to 128; a K tail is cut off again)."""
    x = jax.random.normal(key, shape, jnp.float32) * scale
    q, s = fp8.quantize_fp8(x, block)
    return q[..., :shape[-1]], s


def _tile(spec, backend, **heuristic) -> str:
    """The config the op will use, e.g. "128x128/2wg/5st" (cache or heuristic), for reading GPU results."""
    if backend == "xla":
        return "-"
    c = fp8._config(spec, None, backend, **heuristic)
    if isinstance(c, Fp8SwapAbConfig):      # the small-M kernel: tokens x B rows per CTA
        return f"swapAB {c.block_tokens}x{c.cta_rows}/{c.num_compute_wgs}wg/{c.stages}st"
    return f"{c.cta_block_m}x{c.cta_block_n}/{c.num_compute_wgs}wg/{c.stages}st"


def _row(kind, shape, spec, f, args, base, base_args, base_name, backend, **heuristic):
    """Time `f(*args)` and the baseline (cold L2), and check the op against the baseline's result."""
    t = cold_l2_time(f, args, spec.min_bytes())
    t_base = cold_l2_time(base, base_args, sum(x.nbytes for x in base_args))
    return {"kind": kind, "shape": "x".join(map(str, shape)), "backend": backend,
            "tile": _tile(spec, backend, **heuristic), "us": t * 1e6,
            "tflops": spec.flops() / t / 1e12, "frac_of_floor": spec.floor_seconds(H200) / t,
            "baseline": base_name, "baseline_us": t_base * 1e6, "speedup": t_base / t,
            "err_vs_baseline": rel_err(f(*args), base(*base_args))}


def _ragged_dot_bf16(x, w, sizes):
    return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def dense_row(shape, backend):
    m, n, k = shape
    ka, kb = jax.random.split(jax.random.key(m * 7 + n * 3 + k))
    a, sa = _quant(ka, (m, k), (1, 128))
    b, sb = _quant(kb, (n, k), (128, 128), 0.05)
    spec = GemmSpec(m=m, n=n, k=k, a_dtype="float8_e4m3fn", b_dtype="float8_e4m3fn", a_scale=(1, 128),
                    b_scale=(128, 128))
    f = jax.jit(functools.partial(fp8.fp8_gemm_nt, backend=backend))
    base = jax.jit(lambda a, sa, b, sb: jnp.einsum(
        "mk,nk->mn", fp8.dequantize_fp8(a, sa, dtype=jnp.bfloat16),
        fp8.dequantize_fp8(b, sb, (128, 128), dtype=jnp.bfloat16), preferred_element_type=jnp.float32
    ).astype(jnp.bfloat16))
    return _row("dense", (m, n, k), spec, f, (a, sa, b, sb), base, (a, sa, b, sb), "xla_dequant_bf16", backend)


def contiguous_row(shape, backend):
    g, m_per, n, k = shape
    m = g * m_per
    ka, kb = jax.random.split(jax.random.key(g + m + n + k))
    a, sa = _quant(ka, (m, k), (1, 128))
    b, sb = _quant(kb, (g, n, k), (128, 128), 0.05)
    sizes = jnp.full((g,), m_per, jnp.int32)
    spec = GroupedGemmSpec(num_groups=g, m=m, n=n, k=k, layout="contiguous")
    f = jax.jit(functools.partial(fp8.m_grouped_fp8_gemm_nt_contiguous, backend=backend))
    a16 = fp8.dequantize_fp8(a, sa, dtype=jnp.bfloat16)
    b16 = jnp.swapaxes(fp8.dequantize_fp8(b, sb, (128, 128), dtype=jnp.bfloat16), 1, 2)   # [G, K, N]
    base = jax.jit(_ragged_dot_bf16)
    return _row("contiguous", (g, m_per, n, k), spec, f, (a, sa, b, sb, sizes), base, (a16, b16, sizes),
                "ragged_dot_bf16", backend, min_block_n=64)


def masked_row(shape, backend):
    g, m_max, n, k = shape
    ka, kb = jax.random.split(jax.random.key(g * m_max + n + k))
    a, sa = _quant(ka, (g, m_max, k), (1, 128))
    b, sb = _quant(kb, (g, n, k), (128, 128), 0.05)
    masked = jnp.full((g,), m_max, jnp.int32)
    spec = GroupedGemmSpec(num_groups=g, m=m_max, n=n, k=k, layout="masked", expected_m=m_max)
    f = jax.jit(functools.partial(fp8.m_grouped_fp8_gemm_nt_masked, backend=backend))
    a16 = fp8.dequantize_fp8(a, sa, dtype=jnp.bfloat16).reshape(g * m_max, k)
    b16 = jnp.swapaxes(fp8.dequantize_fp8(b, sb, (128, 128), dtype=jnp.bfloat16), 1, 2)
    base = jax.jit(_ragged_dot_bf16)
    return _row("masked", (g, m_max, n, k), spec, lambda *x: f(*x).reshape(g * m_max, n), (a, sa, b, sb, masked),
                base, (a16, b16, masked), "ragged_dot_bf16", backend)


def train_row(shape, backend):
    """`grouped_fp8_linear`'s forward + dgrad + wgrad (quantisation included) against the same VJP of a bf16
    ragged_dot: what training MoE experts in FP8 costs per step, both on unaligned per-expert token counts."""
    g, m_per, n, k = shape
    m = g * m_per
    kx, kw, kd = jax.random.split(jax.random.key(g + m + n + k), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (g, n, k), jnp.float32) * 0.05
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    sizes = jnp.asarray([m_per + (37 if i % 2 else -37) for i in range(g)], jnp.int32)   # sum m, not 128-aligned

    def vjp(lin):
        def run(x, w, dy, sizes):
            y, back = jax.vjp(lambda x, w: lin(x, w, sizes), x, w)
            return (y, *back(dy))
        return jax.jit(run)

    f = vjp(lambda x, w, s: fp8.grouped_fp8_linear(x, w, s, backend=backend))
    base = vjp(lambda x, w, s: _ragged_dot_bf16(x, jnp.swapaxes(w, 1, 2).astype(jnp.bfloat16), s))
    args = (x, w, dy, sizes)
    nbytes = sum(a.nbytes for a in args)
    t, t_base = cold_l2_time(f, args, nbytes), cold_l2_time(base, args, nbytes)
    spec = GroupedGemmSpec(num_groups=g, m=m, n=n, k=k, layout="contiguous")
    got, want = f(*args), base(*args)
    return {"kind": "train_vjp", "shape": "x".join(map(str, shape)), "backend": backend, "tile": "fwd+dgrad+wgrad",
            "us": t * 1e6, "tflops": 3 * spec.flops() / t / 1e12, "frac_of_floor": 3 * spec.floor_seconds(H200) / t,
            "baseline": "ragged_dot_bf16_vjp", "baseline_us": t_base * 1e6, "speedup": t_base / t,
            "err_vs_baseline": max(rel_err(a, b) for a, b in zip(got, want))}


def quantize_row(shape, backend):
    """Per-token (1, 128) quantisation: the kernel vs XLA's fused version; floor = bytes / HBM bandwidth."""
    m, k = shape
    x = jax.random.normal(jax.random.key(m + k), (m, k), jnp.bfloat16)
    f = jax.jit(functools.partial(fp8.quantize_fp8, backend=backend))
    base = jax.jit(functools.partial(fp8.quantize_fp8, backend="xla"))
    nbytes = m * k * 2 + m * k + 4 * m * k // 128
    t, t_base = cold_l2_time(f, (x,), nbytes), cold_l2_time(base, (x,), nbytes)
    (q, sc), (rq, rsc) = f(x), base(x)
    err = max(rel_err(fp8.dequantize_fp8(q, sc), fp8.dequantize_fp8(rq, rsc)), rel_err(sc, rsc))
    return {"kind": "quantize", "shape": f"{m}x{k}", "backend": backend,
            "tile": "-" if backend == "xla" else "64x128", "us": t * 1e6,
            "tflops": 0.0, "frac_of_floor": nbytes / H200.hbm_bandwidth / t, "baseline": "xla_quantize",
            "baseline_us": t_base * 1e6, "speedup": t_base / t, "err_vs_baseline": err}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only", choices=("dense", "contiguous", "masked", "quantize", "train_vjp"), default=None)
    p.add_argument("--autotune", action="store_true", help="GPU: autotune each dense shape first (cached winners)")
    args = p.parse_args()
    gpu = is_hopper()
    quick = args.quick or not gpu
    backend = "mosaic" if gpu else "xla"
    if args.autotune and gpu:
        for m, n, k in (QUICK_DENSE if quick else DENSE):
            print("autotuned", (m, n, k), fp8.autotune_fp8_gemm_nt(m, n, k), flush=True)
    dense = [(dense_row, sh, "dense") for sh in (QUICK_DENSE if quick else DENSE)]
    plan = dense[:len(NK)] if not quick else []          # the large-M dense shapes, then grouped, then small M
    plan += [(dense_row, sh, "dense") for sh in ([] if quick else K_TAIL)]
    plan += [(contiguous_row, sh, "contiguous") for sh in (QUICK_CONTIGUOUS if quick else CONTIGUOUS)]
    plan += [(masked_row, sh, "masked") for sh in (QUICK_MASKED if quick else MASKED)]
    plan += dense[len(NK):] if not quick else dense
    plan += [(dense_row, sh, "dense") for sh in ([] if quick else SMALL_M)]
    plan += [(quantize_row, sh, "quantize") for sh in (QUICK_QUANTIZE if quick else QUANTIZE)]
    plan += [(train_row, sh, "train_vjp") for sh in (QUICK_TRAIN if quick else TRAIN)]
    rows = []
    for fn, shape, kind in plan:
        if args.only not in (None, kind):
            continue
        try:
            rows.append(fn(shape, backend))
        except Exception as e:  # noqa: BLE001 - one failing shape must not hide the others' numbers
            nan = float("nan")
            rows.append({"kind": kind, "shape": "x".join(map(str, shape)), "backend": backend, "tile": "?",
                         "us": nan, "tflops": nan, "frac_of_floor": nan,
                         "baseline": f"ERROR {type(e).__name__}: {str(e)[:200]}", "baseline_us": nan, "speedup": nan,
                         "err_vs_baseline": nan})
        print(rows[-1], flush=True)
        save_partial("fp8_gemm", rows, args.json)
    emit("fp8_gemm", rows, args.json)
    if not gpu:
        print("(CPU dry run: xla backend only; ratios compare XLA paths, not the Mosaic kernels)")


if __name__ == "__main__":
    main()
