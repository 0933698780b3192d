"""FP8 GEMMs with DeepGEMM's fine-grained scaling: quantisation, dense and MoE-grouped GEMMs, `fp8_linear`.

Every op runs one skeleton: validate once (the `validate_*` functions; a ValueError for every backend), pick a
tile config (explicit `config=` > the autotuner's cache, `ir/config_cache.py` > `choose_fp8_config`), then let
`lowering.backend.run_op` choose the backend: "mosaic" (the Hopper kernels in `seekax.lowering.mosaic`),
"interpret" (the same kernels on the CPU interpreter), "xla" (the plain-jnp oracle in
`seekax.lowering.reference.fp8_gemm`), or "auto" (the kernel on sm_90 when it takes the shape, else xla).
Scale conventions (e4m3, 128-wide blocks, the amax floor): `seekax.ir.fp8`.
"""

from __future__ import annotations

import functools
import importlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.config_cache import pick_config
from seekax.ir.fp8 import ACT_BLOCK, FP8_DTYPE, SCALE_BLOCK, WEIGHT_BLOCK
from seekax.ir.fp8_tiling import Fp8SwapAbConfig, Fp8TileConfig, choose_fp8_config, fp8_config_from_dict
from seekax.ir.gemm import OUT_DTYPES, GemmSpec, GroupedGemmSpec
from seekax.ir.validate import check_array_dtype, check_shape, fail
from seekax.lowering.backend import check_backend, kernel_takes, num_sms_for, run_kernel, run_op
from seekax.lowering.reference import fp8_gemm as ref

BLOCK = SCALE_BLOCK          # the scale block along K, as the layers name it
cdiv = ref.cdiv


# ----------------------------------------------------------------------------------------------- validation
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_rank(name: str, x: Any, ndim: int, layout: str) -> None:
    if getattr(x, "ndim", None) != ndim:
        raise fail(f"{name}.shape", tuple(getattr(x, "shape", ())) or None, layout)


def _check_operand(name: str, x: Any, ndim: int, layout: str) -> None:
    _check_rank(name, x, ndim, layout)
    check_array_dtype(name, x, (FP8_DTYPE,))


def _check_scale(name: str, s: Any, expected: tuple[int, ...]) -> None:
    _check_rank(name, s, len(expected), f"shape {expected}")
    check_array_dtype(name, s, ("float32",))
    check_shape(name, s.shape, expected)


def _check_out_dtype(out_dtype) -> str:
    try:
        name = np.dtype(out_dtype).name
    except TypeError:
        raise fail("out_dtype", out_dtype, f"one of {OUT_DTYPES}") from None
    if name not in OUT_DTYPES:
        raise fail("out_dtype", out_dtype, f"one of {OUT_DTYPES}")
    return name


def _check_sizes(name: str, sizes: Any, groups: int, *, total: int, exact: bool = False,
                 multiple_of: int | None = None) -> None:
    """Group sizes: shape [G], int32; when concrete also >= 0, summing to <= total (== total if exact)."""
    _check_rank(name, sizes, 1, f"[{groups}] (one size per group)")
    check_shape(name, sizes.shape, (groups,))
    check_array_dtype(name, sizes, ("int32",))
    if not _is_concrete(sizes):
        return  # traced under jit: values are the caller's contract (documented in each op)
    v = np.asarray(sizes)
    if (v < 0).any():
        raise fail(name, v.tolist(), "non-negative sizes")
    s = int(v.sum())
    if (exact and s != total) or s > total:
        raise fail(name, v.tolist(), f"sizes summing to {'exactly ' if exact else 'at most '}{total}, got {s}")
    if multiple_of and (v % multiple_of).any():
        raise fail(name, v.tolist(), f"multiples of {multiple_of}")


def _resolve_out_dtype(out_dtype, c, default: str = "bfloat16") -> str:
    """out_dtype None: `default`, or float32 when accumulating into c (c + A B is float32, as DeepGEMM's)."""
    if out_dtype is None:
        return "float32" if c is not None else default
    name = _check_out_dtype(out_dtype)
    if c is not None and name != "float32":
        raise fail("out_dtype", out_dtype, "float32 (or None) when c is given: c + A B is float32")
    return name


def _check_c(c, expected: tuple[int, ...], layout: str) -> None:
    """The accumulator input: float32 of the output's shape."""
    if c is None:
        return
    _check_rank("c", c, len(expected), layout)
    check_array_dtype("c", c, ("float32",))
    check_shape("c", c.shape, expected)


def _check_block(name: str, block) -> tuple[int, int]:
    block = tuple(block) if isinstance(block, (tuple, list)) else block
    if block not in (ACT_BLOCK, WEIGHT_BLOCK):
        raise fail(name, block, f"{WEIGHT_BLOCK} (a scale per 128 x 128 block of B) or {ACT_BLOCK} (per row and "
                                "128 columns, the weight gradient's recipe)")
    return block


def validate_fp8_gemm_nt(a, a_scale, b, b_scale, out_dtype, *, b_block=WEIGHT_BLOCK, c=None) -> GemmSpec:
    """a: [M, K] e4m3, a_scale: [M, ceil(K/128)] f32, b: [N, K] e4m3 (K-major), b_scale: [ceil(N/128), ceil(K/128)]
    (b_block (128, 128)) or [N, ceil(K/128)] (b_block (1, 128)); c: [M, N] f32 or None."""
    _check_operand("a", a, 2, "[M, K]")
    _check_operand("b", b, 2, "[N, K] (K-major)")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise fail("b.shape", tuple(b.shape), f"[N, K] with K={k} matching a.shape={tuple(a.shape)} (K-major B)")
    b_block = _check_block("b_block", b_block)
    _check_scale("a_scale", a_scale, (m, cdiv(k, BLOCK)))
    _check_scale("b_scale", b_scale, (cdiv(n, b_block[0]), cdiv(k, BLOCK)))
    _check_c(c, (m, n), f"[M, N] = [{m}, {n}]")
    return GemmSpec(m=m, n=n, k=k, a_dtype=FP8_DTYPE, b_dtype=FP8_DTYPE, out_dtype=_resolve_out_dtype(out_dtype, c),
                    a_scale=ACT_BLOCK, b_scale=b_block, accumulate=c is not None)


def _validate_grouped_b(b, b_scale, k: int, name_k: str) -> tuple[int, int]:
    _check_operand("b", b, 3, "[G, N, K] (K-major)")
    g, n, kb_ = b.shape
    if kb_ != k:
        raise fail("b.shape", tuple(b.shape), f"[G, N, K] with K={k} matching {name_k} (K-major B)")
    _check_scale("b_scale", b_scale, (g, cdiv(n, BLOCK), cdiv(k, BLOCK)))
    return g, n


def _check_m_indices(m_indices, m: int, groups: int) -> None:
    """m_indices: [M] int32 in [-1, G); when concrete, each group's rows also form one run (the layout DeepEP's
    dispatch emits: rows sorted by expert, -1 padding rows between experts)."""
    _check_rank("m_indices", m_indices, 1, f"[M] = [{m}] (one group id per row, -1 for padding)")
    check_shape("m_indices", m_indices.shape, (m,))
    check_array_dtype("m_indices", m_indices, ("int32",))
    if not _is_concrete(m_indices):
        return  # traced under jit: the layout is the caller's contract (documented in the op)
    v = np.asarray(m_indices)
    bad = np.flatnonzero((v < -1) | (v >= groups))
    if bad.size:
        raise fail("m_indices", f"{int(v[bad[0]])} at row {int(bad[0])}", f"group ids in [-1, G={groups})")
    for g in np.unique(v[v >= 0]):
        rows = np.flatnonzero(v == g)
        if rows[-1] - rows[0] + 1 != rows.size:
            raise fail("m_indices", f"group {int(g)} at rows {rows[0]}..{rows[-1]} with gaps",
                       "each group's rows contiguous (padding rows, -1, only between groups)")


def validate_m_grouped_contiguous(a, a_scale, b, b_scale, group_sizes, out_dtype, *,
                                  m_indices=None) -> GroupedGemmSpec:
    """a: [M, K] e4m3 (rows sorted by group), b: [G, N, K]; exactly one of group_sizes [G] and m_indices [M]."""
    _check_operand("a", a, 2, "[M, K] (rows sorted by group)")
    m, k = a.shape
    g, n = _validate_grouped_b(b, b_scale, k, f"a.shape={tuple(a.shape)}")
    _check_scale("a_scale", a_scale, (m, cdiv(k, BLOCK)))
    if (group_sizes is None) == (m_indices is None):
        raise fail("group_sizes", group_sizes if m_indices is None else "given with m_indices",
                   "exactly one of group_sizes [G] and m_indices [M]")
    if m_indices is None:
        _check_sizes("group_sizes", group_sizes, g, total=m)
    else:
        _check_m_indices(m_indices, m, g)
    return GroupedGemmSpec(num_groups=g, m=m, n=n, k=k, layout="contiguous", out_dtype=_check_out_dtype(out_dtype))


def validate_m_grouped_masked(a, a_scale, b, b_scale, masked_m, out_dtype) -> GroupedGemmSpec:
    _check_operand("a", a, 3, "[G, M_max, K]")
    g, m_max, k = a.shape
    gb, n = _validate_grouped_b(b, b_scale, k, f"a.shape={tuple(a.shape)}")
    if gb != g:
        raise fail("b.shape", tuple(b.shape), f"[G, N, K] with G={g} groups like a")
    _check_scale("a_scale", a_scale, (g, m_max, cdiv(k, BLOCK)))
    _check_rank("masked_m", masked_m, 1, f"[{g}]")
    check_shape("masked_m", masked_m.shape, (g,))
    check_array_dtype("masked_m", masked_m, ("int32",))
    if _is_concrete(masked_m):
        v = np.asarray(masked_m)
        if (v < 0).any() or (v > m_max).any():
            raise fail("masked_m", v.tolist(), f"values in [0, M_max={m_max}]")
    return GroupedGemmSpec(num_groups=g, m=m_max, n=n, k=k, layout="masked", out_dtype=_check_out_dtype(out_dtype))


def validate_k_grouped(a, a_scale, b, b_scale, group_sizes_k, out_dtype, *, c=None) -> GroupedGemmSpec:
    _check_operand("a", a, 2, "[sum_K, M] (token-major)")
    _check_operand("b", b, 2, "[sum_K, N] (token-major)")
    total, m = a.shape
    n = b.shape[1]
    if b.shape[0] != total:
        raise fail("b.shape", tuple(b.shape), f"[sum_K, N] with sum_K={total} rows like a.shape={tuple(a.shape)}")
    if total % BLOCK:
        raise fail("a.shape", tuple(a.shape), f"[sum_K, M] with sum_K a multiple of {BLOCK}")
    _check_scale("a_scale", a_scale, (total // BLOCK, m))
    _check_scale("b_scale", b_scale, (total // BLOCK, n))
    _check_rank("group_sizes_k", group_sizes_k, 1, "[G]")
    g = group_sizes_k.shape[0]
    _check_sizes("group_sizes_k", group_sizes_k, g, total=total, exact=True, multiple_of=BLOCK)
    _check_c(c, (g, m, n), f"[G, M, N] = [{g}, {m}, {n}]")
    return GroupedGemmSpec(num_groups=g, m=m, n=n, k=total, layout="k_grouped",
                           out_dtype=_resolve_out_dtype(out_dtype, c, "float32"), accumulate=c is not None)


def _check_grouped_config(config) -> None:
    """The grouped kernels take an Fp8TileConfig (the small-M Fp8SwapAbConfig is the dense GEMM's)."""
    if config is not None and not isinstance(config, Fp8TileConfig):
        raise fail("config", config, "None or an Fp8TileConfig (Fp8SwapAbConfig is for fp8_gemm_nt)")


def _validate_quantize(x, block) -> tuple[int, int]:
    block = tuple(block) if isinstance(block, (tuple, list)) else block
    if block not in (ACT_BLOCK, WEIGHT_BLOCK):
        raise fail("block", block, f"{ACT_BLOCK} or {WEIGHT_BLOCK}")
    if getattr(x, "ndim", 0) < 2:
        raise fail("x.shape", tuple(getattr(x, "shape", ())), "[..., M, K] (at least 2 dims)")
    check_array_dtype("x", x, ("float32", "bfloat16", "float16"))
    return block


# ----------------------------------------------------------------------------------------------- quantisation
def quantize_fp8(x, block=ACT_BLOCK, *, pow2_scale: bool = False, backend: str = "xla"):
    """x: [..., M, K] f32/bf16/f16 -> (x_fp8 [..., M, K_pad] e4m3, scale [..., ceil(M/b0), ceil(K/128)] f32).

    scale = max(amax, 1e-4) / 448 per block (block = (1, 128) activations, (128, 128) weights; `seekax.ir.fp8`),
    K zero-padded to a multiple of 128; an all-zero block gets scale 1e-4 / 448 and quantises to zeros.
    pow2_scale rounds scales up to powers of two (UE8M0-style). The Mosaic kernel covers per-token (1, 128)
    groups with K a multiple of 128 and plain scales (bit-equal to the xla path); anything else runs on XLA,
    which fuses this memory-bound work. The default backend is "xla" (not "auto") until a GPU benchmark shows
    the kernel pays: callers' kernel counts stay unchanged.
    """
    block = _validate_quantize(x, block)

    def kernel(backend):
        if block != ACT_BLOCK or pow2_scale:
            raise NotImplementedError(f"block={block}, pow2_scale={pow2_scale}: the quantisation kernel covers "
                                      f"block={ACT_BLOCK} without pow2_scale")
        *lead, m, k = x.shape
        x2 = x.reshape(-1, k)                                                       # [T, K]
        q, s = run_kernel(_mosaic("fp8_quant_sm90.build")(x2.shape[0], k, x.dtype), x2, backend=backend)
        return q.reshape(*lead, m, k), s.reshape(*lead, m, k // BLOCK)

    return run_op(backend, kernel=kernel, reference=lambda: ref.quantize_fp8(x, block, pow2_scale=pow2_scale),
                  name="quantize_fp8")


def dequantize_fp8(x_fp8, scale, block=ACT_BLOCK, *, dtype=jnp.float32):
    """x_fp8: [..., M, K] e4m3, scale: [..., ceil(M/b0), ceil(K/128)] -> [..., M, K] in `dtype` (XLA only)."""
    block = tuple(block) if isinstance(block, (tuple, list)) else block
    if block not in (ACT_BLOCK, WEIGHT_BLOCK):
        raise fail("block", block, f"{ACT_BLOCK} or {WEIGHT_BLOCK}")
    if getattr(x_fp8, "ndim", 0) < 2:
        raise fail("x_fp8.shape", tuple(getattr(x_fp8, "shape", ())), "[..., M, K]")
    check_array_dtype("x_fp8", x_fp8, (FP8_DTYPE,))
    *lead, m, k = x_fp8.shape
    _check_scale("scale", scale, (*lead, cdiv(m, block[0]), cdiv(k, BLOCK)))
    return ref.dequantize_fp8(x_fp8, scale, block, dtype=dtype)


# ----------------------------------------------------------------------------------------------- the GEMMs
def _mosaic(name: str) -> Callable[..., Any]:
    """`module.function` of `seekax.lowering.mosaic`, imported on the kernel path only: a caller that never
    asks for a kernel never loads one."""
    module, function = name.split(".")
    return getattr(importlib.import_module(f"seekax.lowering.mosaic.{module}"), function)


def _config(spec, config: Fp8TileConfig | Fp8SwapAbConfig | None, backend: str,
            **heuristic) -> Fp8TileConfig | Fp8SwapAbConfig:
    """Explicit config > autotuned winner cached for this spec/device/jax (on the device only) > heuristic."""
    return pick_config(config, spec_key=spec.key(), from_dict=fp8_config_from_dict,
                       heuristic=lambda: choose_fp8_config(spec, **heuristic), use_cache=backend == "mosaic")


def _run_gemm(spec, args: tuple, *, build: str, reference: Callable[..., Any], backend: str,
              config: Fp8TileConfig | Fp8SwapAbConfig | None, num_sms: int | None, build_kwargs: dict | None = None,
              **heuristic) -> jax.Array:
    """The four GEMMs after validation: the kernel path picks a config and builds `build` (a
    `module.function` of `seekax.lowering.mosaic`, called as build(spec, config, num_sms, **build_kwargs)); the
    kernel and the reference both take `args`; `run_op` chooses."""

    def kernel(resolved):
        cfg = _config(spec, config, resolved, **heuristic)
        run = _mosaic(build)(spec, cfg, num_sms or num_sms_for(resolved), **(build_kwargs or {}))
        return run_kernel(run, *args, backend=resolved)

    return run_op(backend, kernel=kernel, reference=lambda: reference(*args, out_dtype=spec.out_dtype),
                  name=getattr(reference, "__name__", "fp8_gemm_nt"))


def fp8_gemm_nt(a, a_scale, b, b_scale, *, out_dtype=None, c=None, b_block=WEIGHT_BLOCK, backend: str = "auto",
                config: Fp8TileConfig | Fp8SwapAbConfig | None = None, num_sms: int | None = None):
    """out[M, N] = c + (a * a_scale) @ (b * b_scale)^T, fp32 accumulation promoted every 128-K block.

    a: [M, K] e4m3, a_scale: [M, ceil(K/128)] f32; b: [N, K] e4m3 (K-major) with b_scale [ceil(N/128), ceil(K/128)]
    (b_block=(128, 128): weights) or [N, ceil(K/128)] (b_block=(1, 128): per-token scales on both operands, the
    weight gradient dW = dY^T X); c: [M, N] f32 or None, accumulated into by the kernel's epilogue.
    out_dtype: None = bfloat16, or float32 with c. Mosaic kernel: M >= 1, N a multiple of 16, K a multiple of
    32 (a tail past the last 128-wide block is zero-filled by TMA). M of 1..64 (decode) runs the small-M kernel
    (`Fp8SwapAbConfig`: B's rows on wgmma's 64-row side, the tokens on its N side) where the heuristic or
    `config` picks it.
    """
    spec = validate_fp8_gemm_nt(a, a_scale, b, b_scale, out_dtype, b_block=b_block, c=c)
    args = (a, a_scale, b, b_scale) + (() if c is None else (c,))
    return _run_gemm(spec, args, build="fp8_gemm_sm90.build",
                     reference=functools.partial(ref.fp8_gemm_nt, b_block=spec.b_scale), backend=backend,
                     config=config, num_sms=num_sms)


def m_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, group_sizes=None, *, m_indices=None,
                                     out_dtype=jnp.bfloat16, backend: str = "auto",
                                     config: Fp8TileConfig | None = None, num_sms: int | None = None):
    """MoE experts, tokens sorted by expert: out[r] = a[r] @ b[group(r)]^T for rows some group owns, else 0.

    a: [M, K] e4m3, a_scale: [M, ceil(K/128)]; b: [G, N, K] e4m3, b_scale: [G, ceil(N/128), ceil(K/128)] -> [M, N].
    Groups by exactly one of: group_sizes [G] int32 (>= 0, sum <= M; group g owns the next group_sizes[g] rows,
    rows past the sum are padding), or m_indices [M] int32 (DeepGEMM's / DeepEP's layout: each row's group,
    -1 for padding rows, each group's rows contiguous). Both are checked when concrete; under jit they are the
    caller's contract. Padding rows of a and a_scale are never used (NaN there stays out of the output) and
    their output rows are 0. Mosaic kernel: M >= 1, N a multiple of 16 with output rows of >= 128 bytes,
    K a multiple of 32.
    """
    spec = validate_m_grouped_contiguous(a, a_scale, b, b_scale, group_sizes, out_dtype, m_indices=m_indices)
    _check_grouped_config(config)
    by_row = m_indices is not None
    return _run_gemm(spec, (a, a_scale, b, b_scale, m_indices if by_row else group_sizes),
                     build="fp8_grouped_gemm_sm90.build_contiguous", build_kwargs={"by_row": by_row},
                     reference=(ref.m_grouped_fp8_gemm_nt_contiguous_rows if by_row
                                else ref.m_grouped_fp8_gemm_nt_contiguous),
                     backend=backend, config=config, num_sms=num_sms,
                     min_block_n=128 // np.dtype(spec.out_dtype).itemsize, tile_epilogue=True)


def m_grouped_fp8_gemm_nt_masked(a, a_scale, b, b_scale, masked_m, *, out_dtype=jnp.bfloat16,
                                 backend: str = "auto", config: Fp8TileConfig | None = None,
                                 num_sms: int | None = None):
    """Fixed-buffer decode layout (DeepEP low-latency): out[g, r] = a[g, r] @ b[g]^T for r < masked_m[g], else 0.

    a: [G, M_max, K] e4m3, a_scale: [G, M_max, ceil(K/128)]; b: [G, N, K], b_scale: [G, ceil(N/128), ceil(K/128)];
    masked_m: [G] int32 in [0, M_max] -> [G, M_max, N]. Mosaic kernel: M_max >= 1, N a multiple of 16, K of 128.
    """
    spec = validate_m_grouped_masked(a, a_scale, b, b_scale, masked_m, out_dtype)
    _check_grouped_config(config)
    return _run_gemm(spec, (a, a_scale, b, b_scale, masked_m), build="fp8_grouped_gemm_sm90.build_masked",
                     reference=ref.m_grouped_fp8_gemm_nt_masked, backend=backend, config=config, num_sms=num_sms)


def k_grouped_fp8_gemm_tn_contiguous(a, a_scale, b, b_scale, group_sizes_k, *, c=None, out_dtype=None,
                                     backend: str = "auto", config: Fp8TileConfig | None = None,
                                     num_sms: int | None = None):
    """Expert weight gradients (DeepGEMM's k-grouped wgrad): out[g] = c[g] + a[tokens of g]^T @ b[tokens of g].

    a: [sum_K, M] e4m3 and b: [sum_K, N] e4m3, token-major as the forward produced them (dY and X of each
    expert, rows sorted by expert); a_scale: [sum_K/128, M], b_scale: [sum_K/128, N] f32 (one scale per 128
    tokens per column); group_sizes_k: [G] int32, multiples of 128 summing to sum_K; c: [G, M, N] f32 or None
    (gradients accumulated across micro-batches: the kernel adds c in its epilogue, and an empty group's
    output is c[g]) -> [G, M, N] (f32 default). The Mosaic kernel (sum_K, M >= 1, N a multiple of 16)
    transposes the operands to token(K)-major, as FP8 wgmma needs.
    """
    spec = validate_k_grouped(a, a_scale, b, b_scale, group_sizes_k, out_dtype, c=c)
    _check_grouped_config(config)
    args = (a, a_scale, b, b_scale, group_sizes_k) + (() if c is None else (c,))
    return _run_gemm(spec, args, build="fp8_k_grouped_gemm_sm90.build",
                     reference=ref.k_grouped_fp8_gemm_tn_contiguous, backend=backend, config=config,
                     num_sms=num_sms)


# ----------------------------------------------------------------------------------------------- training
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x, w, backend):
    return _fp8_linear_fwd(x, w, backend)[0]


def _fp8_linear_fwd(x, w, backend):
    n, k = w.shape
    x2 = x.reshape(-1, k)                                                   # [T, K]
    xq, xs = ref.quantize_fp8(x2, ACT_BLOCK)                                # [T, Kp], [T, Kb]
    wq, ws = ref.quantize_fp8(w, WEIGHT_BLOCK)                              # [N, Kp], [Nb, Kb]
    y = fp8_gemm_nt(xq, xs, wq, ws, out_dtype=x.dtype, backend=backend)     # [T, N]
    return y.reshape(*x.shape[:-1], n), (x, w)


def _fp8_linear_bwd(backend, res, dy):
    x, w = res
    n, k = w.shape
    dy2 = dy.reshape(-1, n)                                                 # [T, N]
    x2 = x.reshape(-1, k)                                                   # [T, K]
    # dgrad: dx[T, K] = dy[T, N] @ w[N, K], as NT with B = w^T [K, N] in 128x128 blocks.
    dyq, dys = ref.quantize_fp8(dy2, ACT_BLOCK)                             # [T, Np], [T, Nb]
    wtq, wts = ref.quantize_fp8(w.T, WEIGHT_BLOCK)                          # [K, Np], [Kb, Nb]
    dx = fp8_gemm_nt(dyq, dys, wtq, wts, out_dtype=jnp.float32, backend=backend)   # [T, K]
    # wgrad: dw[N, K] = dy^T[N, T] @ x[T, K], as NT with A = dy^T and B = x^T, both scaled per (1, 128) along
    # tokens (DeepSeek-V3's recipe: one scale per channel and 128 tokens, so a channel's outliers stay its own).
    dytq, dyts = ref.quantize_fp8(dy2.T, ACT_BLOCK)                         # [N, Tp], [N, Tb]
    xtq, xts = ref.quantize_fp8(x2.T, ACT_BLOCK)                            # [K, Tp], [K, Tb]
    dw = fp8_gemm_nt(dytq, dyts, xtq, xts, out_dtype=jnp.float32, b_block=ACT_BLOCK, backend=backend)  # [N, K]
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)


def fp8_linear(x, w, *, backend: str = "auto"):
    """y[..., N] = x[..., K] @ w[N, K]^T with on-the-fly FP8 quantisation ((1,128) for x, (128,128) for w).

    Custom VJP: dgrad (dy @ w) and wgrad (dy^T @ x) also run as FP8 NT GEMMs on freshly quantised operands
    (dgrad: dy per (1,128), w^T per (128,128) blocks; wgrad: dy^T and x^T both per (1,128) along the tokens).
    Works under jit and grad.
    """
    if getattr(w, "ndim", None) != 2:
        raise fail("w.shape", tuple(getattr(w, "shape", ())), "[N, K]")
    if getattr(x, "ndim", 0) < 1 or x.shape[-1] != w.shape[1]:
        raise fail("x.shape", tuple(getattr(x, "shape", ())),
                   f"[..., K] with K={w.shape[1]} matching w.shape={tuple(w.shape)}")
    check_array_dtype("x", x, ("float32", "bfloat16", "float16"))
    check_array_dtype("w", w, ("float32", "bfloat16", "float16"))
    check_backend(backend)
    x, w = _same_varying_axes(x, w)
    return _fp8_linear(x, w, backend)


# MoE experts: the grouped GEMMs with the same recipe. The weight gradient is DeepGEMM's k-grouped GEMM, whose
# groups must be whole 128-token blocks (one scale per 128 tokens and channel), so dy and x are first spread
# into a copy where each group starts on a 128-row boundary (the gaps zero: they add nothing).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_fp8_linear(x, w, group_sizes, backend):
    return _grouped_fp8_linear_fwd(x, w, group_sizes, backend)[0]


def _grouped_out_dtype(x):
    return x.dtype if jnp.dtype(x.dtype).name == "bfloat16" else jnp.float32


def _grouped_fp8_linear_fwd(x, w, group_sizes, backend):
    xq, xs = ref.quantize_fp8(x, ACT_BLOCK)                                 # [M, Kp], [M, Kb]
    wq, ws = ref.quantize_fp8(w, WEIGHT_BLOCK)                              # [G, N, Kp], [G, Nb, Kb]
    y = m_grouped_fp8_gemm_nt_contiguous(xq, xs, wq, ws, group_sizes, out_dtype=_grouped_out_dtype(x),
                                         backend=backend)                  # [M, N]
    return y.astype(x.dtype), (x, w, group_sizes)


def block_aligned_rows(group_sizes, m: int, block: int = SCALE_BLOCK):
    """Rows of groups laid out back to back (group g: group_sizes[g] rows) -> where each row goes when every
    group starts on a multiple of `block`: (dest [M] int32, past the copy for rows in no group; aligned sizes
    [G] int32 whose sum is the copy's static length round_up(M + G * (block - 1), block), the slack given to
    the last group)."""
    g = group_sizes.shape[0]
    total = cdiv(m + g * (block - 1), block) * block
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)                   # [G]
    ends = jnp.cumsum(sizes)                                                # [G]
    aligned = cdiv(sizes, block) * block                                    # [G] (cdiv works on arrays)
    aligned_starts = jnp.cumsum(aligned) - aligned                          # [G]
    rows = jnp.arange(m, dtype=jnp.int32)                                   # [M]
    gid = jnp.searchsorted(ends, rows, side="right")                        # [M] G = in no group
    inside = gid < g
    gid = jnp.minimum(gid, g - 1)
    dest = jnp.where(inside, aligned_starts[gid] + rows - (ends - sizes)[gid], total)  # [M]
    aligned = aligned.at[-1].add(total - jnp.sum(aligned))                  # [G] the slack (zeros) to the last
    return dest, aligned, total


def _grouped_fp8_linear_bwd(backend, res, dy):
    x, w, group_sizes = res
    m = x.shape[0]
    # dgrad: dx[M, K] = dy[M, N] @ w[g][N, K], as NT with B = w[g]^T [K, N] in 128x128 blocks; rows in no
    # group get 0.
    dyq, dys = ref.quantize_fp8(dy, ACT_BLOCK)                              # [M, Np], [M, Nb]
    wtq, wts = ref.quantize_fp8(jnp.swapaxes(w, 1, 2), WEIGHT_BLOCK)        # [G, K, Np], [G, Kb, Nb]
    dx = m_grouped_fp8_gemm_nt_contiguous(dyq, dys, wtq, wts, group_sizes, out_dtype=jnp.float32,
                                          backend=backend)                 # [M, K]
    # wgrad: dw[g][N, K] = dy[rows of g]^T @ x[rows of g], k-grouped over 128-aligned token blocks, both operands
    # scaled per (128 tokens, 1 channel).
    dest, aligned, total = block_aligned_rows(group_sizes, m)
    spread = lambda a: jnp.zeros((total, a.shape[1]), jnp.float32).at[dest].set(  # noqa: E731
        a.astype(jnp.float32), mode="drop")                                # [T_al, C]
    dyq_t, dys_t = ref.quantize_fp8(spread(dy).T, ACT_BLOCK)                # [N, T_al], [N, T_al/128]
    xq_t, xs_t = ref.quantize_fp8(spread(x).T, ACT_BLOCK)                   # [K, T_al], [K, T_al/128]
    dw = k_grouped_fp8_gemm_tn_contiguous(dyq_t.T, dys_t.T, xq_t.T, xs_t.T, aligned, out_dtype=jnp.float32,
                                          backend=backend)                 # [G, N, K]
    return (dx.astype(x.dtype), dw.astype(w.dtype),
            np.zeros(group_sizes.shape, jax.dtypes.float0))


_grouped_fp8_linear.defvjp(_grouped_fp8_linear_fwd, _grouped_fp8_linear_bwd)


def grouped_fp8_linear(x, w, group_sizes, *, backend: str = "auto"):
    """MoE experts in training: y[r] = x[r] @ w[g]^T for the rows of group g, rows sorted by group (group g owns
    the next group_sizes[g] rows), rows past sum(group_sizes) 0. x: [M, K] float, w: [G, N, K] float,
    group_sizes: [G] int32 -> [M, N] in x.dtype.

    `fp8_linear` for grouped weights, DeepSeek-V3's recipe: the forward and dgrad run the m-grouped contiguous
    FP8 GEMM (x and dy per (1, 128), w and w^T per (128, 128) blocks), the wgrad DeepGEMM's k-grouped GEMM (dy
    and x per 128 tokens and channel, each group's tokens padded to whole 128-token blocks). Works under jit,
    grad and shard_map; the weights and their gradients stay float.
    """
    if getattr(w, "ndim", None) != 3:
        raise fail("w.shape", tuple(getattr(w, "shape", ())), "[G, N, K] one [N, K] weight per group")
    if getattr(x, "ndim", None) != 2 or x.shape[1] != w.shape[2]:
        raise fail("x.shape", tuple(getattr(x, "shape", ())),
                   f"[M, K] with K={w.shape[2]} matching w.shape={tuple(w.shape)}")
    check_array_dtype("x", x, ("float32", "bfloat16", "float16"))
    check_array_dtype("w", w, ("float32", "bfloat16", "float16"))
    check_backend(backend)
    _check_sizes("group_sizes", group_sizes, w.shape[0], total=x.shape[0])
    x, w = _same_varying_axes(x, w)
    return _grouped_fp8_linear(x, w, group_sizes, backend)


def _same_varying_axes(x, w):
    """Inside shard_map, give x and w the same varying manual axes (pcast), so the custom VJP's cotangents
    (dw varies like dy, hence like x) match the primals' types; the transpose of the cast then sums dw
    over the axes w was replicated on (data parallelism). A no-op outside shard_map."""
    vx = jax.typeof(x).manual_axis_type.varying
    vw = jax.typeof(w).manual_axis_type.varying
    if vx - vw:
        w = jax.lax.pcast(w, tuple(sorted(vx - vw)), to="varying")
    if vw - vx:
        x = jax.lax.pcast(x, tuple(sorted(vw - vx)), to="varying")
    return x, w


# ----------------------------------------------------------------------------------------------- CLI / tuning
def lowering_example(m: int, n: int, k: int) -> tuple[Callable[..., Any], tuple[jax.ShapeDtypeStruct, ...]]:
    """(fn, abstract args) for `seekax lower fp8_gemm`: the dense FP8 GEMM forced onto the Mosaic backend."""
    kb = cdiv(k, BLOCK)
    args = (jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((m, kb), jnp.float32),
            jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((cdiv(n, BLOCK), kb), jnp.float32))
    return functools.partial(fp8_gemm_nt, backend="mosaic"), args


def autotune_fp8_gemm_nt(m: int, n: int, k: int, *, candidates=None, out_dtype=jnp.bfloat16, cache=None,
                         iters: int = 20) -> Fp8TileConfig | Fp8SwapAbConfig:
    """Time each candidate config on the local Hopper GPU and cache the fastest (ConfigCache JSON)."""
    from seekax.ir.config_cache import ConfigCache
    from seekax.ir.device import detect_device
    from seekax.ir.fp8_tiling import candidate_fp8_configs

    dev = detect_device()
    if dev is None:
        raise NotImplementedError("autotuning needs a Hopper GPU")
    _, avals = lowering_example(m, n, k)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float8_e4m3fn)
    b = jnp.asarray(rng.standard_normal((n, k)), jnp.float8_e4m3fn)
    sa = jnp.ones(avals[1].shape, jnp.float32)
    sb = jnp.ones(avals[3].shape, jnp.float32)
    spec = validate_fp8_gemm_nt(a, sa, b, sb, out_dtype)
    build = _mosaic("fp8_gemm_sm90.build")
    runnable = [c for c in candidates or candidate_fp8_configs(spec)
                if kernel_takes(lambda c=c: build(spec, c, num_sms_for("mosaic")))]
    best, best_t = None, float("inf")
    for cfg in runnable:
        f = jax.jit(functools.partial(fp8_gemm_nt, backend="mosaic", config=cfg, out_dtype=out_dtype))
        f(a, sa, b, sb).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(a, sa, b, sb)
        out.block_until_ready()
        t = (time.perf_counter() - t0) / iters
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise NotImplementedError(f"no candidate config runs for m={m} n={n} k={k}")
    (cache or ConfigCache()).put(spec.key(), dev.name, jax.__version__, best.to_dict(), best_t)
    return best
