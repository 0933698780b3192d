"""Plain-jnp oracles for DeepGEMM's FP8 GEMMs: block quantisation and float32-accumulating NT GEMMs.

Conventions (DeepGEMM / DeepEP, `seekax.ir.fp8`): e4m3 operands; a scale per block of (1, 128) for activations
and (128, 128) for weights; scale = max(amax, 1e-4) / 448 so that x ~= x_fp8 * scale (an all-zero block gets
scale 1e-4 / 448 and zeros); K zero-padded to 128. `quantize_fp8` is the one quantiser: DeepEP's FP8 payload
and the FP8 MLA cache use it too. These functions are the test oracle and the "xla" backend. No argument checks
here: the public ops in `seekax.ops.fp8` validate once before any backend.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from seekax.ir.fp8 import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, SCALE_BLOCK

_HI = lax.Precision.HIGHEST


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_axis(x, axis: int, size: int):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def quantize_fp8(x, block=(1, SCALE_BLOCK), *, pow2_scale: bool = False):
    """x: [..., M, K] -> (x_fp8 [..., M, K_pad] e4m3, scale [..., ceil(M/b0), ceil(K/128)] f32).

    block = (b0, 128): (1, 128) per-token groups (activations) or (128, 128) blocks (weights).
    pow2_scale rounds each scale up to a power of two (UE8M0-style), so dequantisation is exact in exponent.
    """
    b0, b1 = block
    *lead, m, k = x.shape
    mb, kb = cdiv(m, b0), cdiv(k, b1)
    xf = _pad_axis(_pad_axis(x.astype(jnp.float32), -1, kb * b1), -2, mb * b0)  # [..., Mb*b0, Kb*128]
    xb = xf.reshape(*lead, mb, b0, kb, b1)                                       # [..., Mb, b0, Kb, 128]
    amax = jnp.max(jnp.abs(xb), axis=(-3, -1))                                    # [..., Mb, Kb]
    scale = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX                               # [..., Mb, Kb]
    if pow2_scale:
        mant, exp = jnp.frexp(scale)                          # scale = mant * 2^exp, mant in [0.5, 1): exact
        scale = jnp.ldexp(jnp.ones_like(scale), exp - (mant == 0.5))              # [..., Mb, Kb] 2^k >= scale
    q = jnp.clip(xb / scale[..., :, None, :, None], -FP8_MAX, FP8_MAX)            # [..., Mb, b0, Kb, 128]
    q = q.reshape(*lead, mb * b0, kb * b1)[..., :m, :].astype(FP8_DTYPE)         # [..., M, K_pad]
    return q, scale


def dequantize_fp8(x_fp8, scale, block=(1, SCALE_BLOCK), *, dtype=jnp.float32):
    """x_fp8: [..., M, K], scale: [..., ceil(M/b0), ceil(K/128)] -> [..., M, K] in `dtype`."""
    b0, b1 = block
    m, k = x_fp8.shape[-2:]
    s = jnp.repeat(jnp.repeat(scale, b0, axis=-2), b1, axis=-1)[..., :m, :k]     # [..., M, K]
    return (x_fp8.astype(jnp.float32) * s).astype(dtype)


def fp8_gemm_nt(a, a_scale, b, b_scale, c=None, *, out_dtype=jnp.bfloat16, b_block=(SCALE_BLOCK, SCALE_BLOCK)):
    """a: [M, K] e4m3, a_scale: [M, Kb]; b: [N, K] e4m3, b_scale: [Nb, Kb] per b_block (128, 128), or [N, Kb]
    per (1, 128); c: [M, N] f32 or None -> c + a @ b^T [M, N] (fp32 accumulation)."""
    a32 = dequantize_fp8(a, a_scale, (1, SCALE_BLOCK))                            # [M, K]
    b32 = dequantize_fp8(b, b_scale, tuple(b_block))                              # [N, K]
    out = jnp.einsum("mk,nk->mn", a32, b32, precision=_HI, preferred_element_type=jnp.float32)  # [M, N]
    if c is not None:
        out = c + out                                                             # [M, N]
    return out.astype(out_dtype)


def m_grouped_fp8_gemm_nt_contiguous(a, a_scale, b, b_scale, group_sizes, *, out_dtype=jnp.bfloat16):
    """a: [M, K] rows sorted by group, b: [G, N, K], group_sizes: [G] -> [M, N]; rows past sum(group_sizes) are 0."""
    m = a.shape[0]
    g, n, k = b.shape
    a32 = dequantize_fp8(a, a_scale, (1, SCALE_BLOCK))                            # [M, K]
    b32 = dequantize_fp8(b, b_scale, (SCALE_BLOCK, SCALE_BLOCK))                  # [G, N, K]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)                         # [G]
    owned = jnp.arange(m)[:, None] < jnp.sum(sizes)                               # [M, 1] rows some group owns
    a32 = jnp.where(owned, a32, 0.0)                                              # padding never read (NaN too)
    rest = jnp.maximum(m - jnp.sum(sizes), 0)[None]                               # [1] rows in no group
    sizes = jnp.concatenate([sizes, rest])                                        # [G+1]
    rhs = jnp.concatenate([b32, jnp.zeros((1, n, k), jnp.float32)])              # [G+1, N, K]
    out = lax.ragged_dot(a32, jnp.swapaxes(rhs, 1, 2), sizes, precision=_HI,
                         preferred_element_type=jnp.float32)                      # [M, N]
    return out.astype(out_dtype)


def m_grouped_fp8_gemm_nt_contiguous_rows(a, a_scale, b, b_scale, m_indices, *, out_dtype=jnp.bfloat16):
    """a: [M, K], b: [G, N, K], m_indices: [M] group of each row (-1: a padding row) -> [M, N]; out[r] =
    a[r] @ b[m_indices[r]]^T, padding rows 0 whatever a holds there. Any row order: rows are sorted by group
    (a stable sort, padding last), multiplied with ragged_dot and put back."""
    m = a.shape[0]
    g, n, k = b.shape
    ids = m_indices.astype(jnp.int32)                                             # [M]
    key = jnp.where((ids >= 0) & (ids < g), ids, g)                              # [M] padding -> group G
    order = jnp.argsort(key, stable=True)                                         # [M] rows by group
    sizes = jnp.zeros((g + 1,), jnp.int32).at[key].add(1)                         # [G+1] rows per group
    a32 = dequantize_fp8(a, a_scale, (1, SCALE_BLOCK))[order]                     # [M, K] sorted
    a32 = jnp.where((key[order] < g)[:, None], a32, 0.0)                          # [M, K] padding never read
    b32 = dequantize_fp8(b, b_scale, (SCALE_BLOCK, SCALE_BLOCK))                  # [G, N, K]
    rhs = jnp.concatenate([b32, jnp.zeros((1, n, k), jnp.float32)])              # [G+1, N, K]
    out = lax.ragged_dot(a32, jnp.swapaxes(rhs, 1, 2), sizes, precision=_HI,
                         preferred_element_type=jnp.float32)                      # [M, N] sorted
    out = jnp.zeros((m, n), jnp.float32).at[order].set(out)                       # [M, N] original order
    return out.astype(out_dtype)


def m_grouped_fp8_gemm_nt_masked(a, a_scale, b, b_scale, masked_m, *, out_dtype=jnp.bfloat16):
    """a: [G, M_max, K], a_scale: [G, M_max, Kb], b: [G, N, K], masked_m: [G] -> [G, M_max, N];
    rows >= masked_m[g] are 0."""
    a32 = dequantize_fp8(a, a_scale, (1, SCALE_BLOCK))                            # [G, M_max, K]
    b32 = dequantize_fp8(b, b_scale, (SCALE_BLOCK, SCALE_BLOCK))                  # [G, N, K]
    out = jnp.einsum("gmk,gnk->gmn", a32, b32, precision=_HI, preferred_element_type=jnp.float32)  # [G, M_max, N]
    rows = jnp.arange(a.shape[1], dtype=jnp.int32)                                # [M_max]
    keep = rows[None, :] < masked_m.astype(jnp.int32)[:, None]                   # [G, M_max]
    return jnp.where(keep[..., None], out, 0.0).astype(out_dtype)


def k_grouped_fp8_gemm_tn_contiguous(a, a_scale, b, b_scale, group_sizes_k, c=None, *, out_dtype=jnp.float32):
    """Expert weight gradients: a: [sum_K, M], b: [sum_K, N] (token-major, as the forward produced them),
    a_scale: [sum_K/128, M], b_scale: [sum_K/128, N] (one scale per 128 tokens per column),
    group_sizes_k: [G] (multiples of 128), c: [G, M, N] f32 or None -> out [G, M, N] with
    out[g] = c[g] + a[rows of g].T @ b[rows of g]."""
    g = group_sizes_k.shape[0]
    a32 = dequantize_fp8(jnp.swapaxes(a, 0, 1), jnp.swapaxes(a_scale, 0, 1), (1, SCALE_BLOCK))  # [M, sum_K]
    b32 = dequantize_fp8(jnp.swapaxes(b, 0, 1), jnp.swapaxes(b_scale, 0, 1), (1, SCALE_BLOCK))  # [N, sum_K]
    total = a.shape[0]
    ends = jnp.cumsum(jnp.maximum(group_sizes_k.astype(jnp.int32), 0))         # [G]
    tok = jnp.arange(total, dtype=jnp.int32)                                    # [sum_K]
    gid = jnp.searchsorted(ends, tok, side="right")                             # [sum_K] group of each token (G = none)
    onehot = (gid[None, :] == jnp.arange(g, dtype=jnp.int32)[:, None]).astype(jnp.float32)  # [G, sum_K]
    out = jnp.einsum("gt,mt,nt->gmn", onehot, a32, b32, precision=_HI,
                     preferred_element_type=jnp.float32)                        # [G, M, N]
    if c is not None:
        out = c + out                                                           # [G, M, N]
    return out.astype(out_dtype)


def fp8_linear(x, w):
    """y = x @ w.T through quantise((1,128)) x quantise((128,128)) and the FP8 GEMM oracle. x: [..., K], w: [N, K]."""
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = quantize_fp8(x.reshape(-1, k), (1, SCALE_BLOCK))                   # [T, Kp], [T, Kb]
    wq, ws = quantize_fp8(w, (SCALE_BLOCK, SCALE_BLOCK))                        # [N, Kp], [Nb, Kb]
    y = fp8_gemm_nt(xq, xs, wq, ws, out_dtype=x.dtype)                          # [T, N]
    return y.reshape(*lead, w.shape[0])



# ----------------------------------------------------------------------------- float64 numpy oracles (tests)
def np_dequantize(x_fp8, scale, block) -> np.ndarray:
    """Float64 numpy dequantisation: x_fp8 [..., M, K] * scale repeated over (b0, 128) blocks."""
    b0, b1 = block
    m, k = x_fp8.shape[-2:]
    s = np.repeat(np.repeat(np.asarray(scale, np.float64), b0, axis=-2), b1, axis=-1)[..., :m, :k]
    return np.asarray(x_fp8).astype(np.float64) * s


def np_gemm_nt(a, a_scale, b, b_scale, b_block=(SCALE_BLOCK, SCALE_BLOCK)) -> np.ndarray:
    """[M, N] float64 from a [M, K] (1x128 scales) and b [N, K] (b_block scales: 128x128 or 1x128); also [G, ...]
    batched."""
    a64 = np_dequantize(a, a_scale, (1, SCALE_BLOCK))
    b64 = np_dequantize(b, b_scale, tuple(b_block))
    return np.matmul(a64, np.swapaxes(b64, -1, -2))


def np_grouped_contiguous(a, a_scale, b, b_scale, group_sizes) -> np.ndarray:
    """[M, N] float64; rows past sum(group_sizes) are zero."""
    out = np.zeros((a.shape[0], b.shape[1]), np.float64)
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        rows = slice(start, start + int(size))
        out[rows] = np_gemm_nt(np.asarray(a)[rows], np.asarray(a_scale)[rows], np.asarray(b)[g], np.asarray(b_scale)[g])
        start += int(size)
    return out


def np_grouped_rows(a, a_scale, b, b_scale, m_indices) -> np.ndarray:
    """[M, N] float64: row r times b[m_indices[r]]^T, zero where m_indices[r] == -1 (those rows never read)."""
    ids = np.asarray(m_indices)
    out = np.zeros((a.shape[0], b.shape[1]), np.float64)
    for g in range(b.shape[0]):
        rows = np.flatnonzero(ids == g)
        if rows.size:
            out[rows] = np_gemm_nt(np.asarray(a)[rows], np.asarray(a_scale)[rows], np.asarray(b)[g],
                                   np.asarray(b_scale)[g])
    return out
