"""Weights that are either float matrices or FP8 block-scaled ones, and the matmuls that take both.

`Fp8Weight` is a weight as DeepSeek's FP8 checkpoints store it and as DeepGEMM's B operand wants it:
e4m3 values [..., N, K] (K-major, the PyTorch `nn.Linear` layout) and `scale_inv` [..., ceil(N/128),
ceil(K/128)] float32 per 128x128 block (w ~= weight * scale_inv; edge blocks partial). A layer holding one
runs its matmul as an FP8 GEMM (activations quantised per (1, 128) on the fly); float weights run as
ordinary matmuls in the activation's dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from seekax.ir.validate import fail
from seekax.ops.fp8 import ACT_BLOCK, BLOCK, WEIGHT_BLOCK, dequantize_fp8, fp8_gemm_nt, fp8_linear, quantize_fp8


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """weight [..., N, K] float8_e4m3fn, scale_inv [..., ceil(N/128), ceil(K/128)] float32."""

    weight: jax.Array
    scale_inv: jax.Array

    def __post_init__(self):
        w, s = self.weight, self.scale_inv
        if not (hasattr(w, "shape") and hasattr(s, "shape")):
            return  # other leaves in the same tree structure (PartitionSpecs, None, sentinels)
        if len(w.shape) >= 2 and len(s.shape) == len(w.shape):
            want = (*w.shape[:-2], cdiv(w.shape[-2], BLOCK), cdiv(w.shape[-1], BLOCK))
            if tuple(s.shape) != want:
                raise fail("scale_inv.shape", tuple(s.shape), f"{want}: one scale per 128x128 block of weight "
                           f"{tuple(w.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape, [..., N, K]."""
        return tuple(self.weight.shape)

    @property
    def ndim(self) -> int:
        return self.weight.ndim

    @classmethod
    def quantize(cls, w: jax.Array) -> "Fp8Weight":
        """w [..., N, K] float -> 128x128 block-scaled e4m3 (K not padded: the checkpoint's shape)."""
        k = w.shape[-1]
        q, s = quantize_fp8(w, WEIGHT_BLOCK)
        return cls(weight=q[..., :k], scale_inv=s)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[..., N, K] in `dtype`."""
        return dequantize_fp8(self.weight, self.scale_inv, WEIGHT_BLOCK, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Train:
    """A float weight trained through FP8 GEMMs: forward, dgrad and wgrad run `fp8_linear` (operands quantised
    on the fly, DeepSeek-V3's training recipe); the weight itself, and its gradient, stay float. Same layout
    as the float weight it wraps ([in, out] for `linear`, [N, K] for `linear_nt`)."""

    w: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def ndim(self) -> int:
        return self.w.ndim

    @property
    def dtype(self):
        return self.w.dtype


def padded_k(w: Fp8Weight) -> jax.Array:
    """The e4m3 values with K zero-padded to a multiple of 128 (the GEMM's contraction tiles); a no-op at
    DeepSeek's dimensions, which are all multiples of 128."""
    k = w.weight.shape[-1]
    pad = cdiv(k, BLOCK) * BLOCK - k
    if not pad:
        return w.weight
    widths = [(0, 0)] * (w.weight.ndim - 1) + [(0, pad)]
    return jnp.pad(w.weight.astype(jnp.float32), widths).astype(w.weight.dtype)


def linear_nt(x: jax.Array, w, *, backend: str = "auto") -> jax.Array:
    """y [..., N] = x [..., K] @ w^T for w [N, K] (float, or an `Fp8Weight`: FP8 GEMM, output in x.dtype)."""
    n, k = w.shape[-2:]
    if x.shape[-1] != k:
        raise fail("x.shape", tuple(x.shape), f"[..., K={k}] matching the weight's [N={n}, K={k}]")
    if isinstance(w, Fp8Train):
        return fp8_linear(x, w.w.astype(x.dtype), backend=backend)
    if isinstance(w, Fp8Weight):
        x2 = x.reshape(-1, k)                                                       # [T, K]
        xq, xs = quantize_fp8(x2, ACT_BLOCK)                                         # [T, Kp], [T, Kb]
        y = fp8_gemm_nt(xq, xs, padded_k(w), w.scale_inv, out_dtype=_out_dtype(x), backend=backend)  # [T, N]
        return y.reshape(*x.shape[:-1], n)
    return jnp.einsum("...k,nk->...n", x, w.astype(x.dtype))


def linear(x: jax.Array, w, *, backend: str = "auto") -> jax.Array:
    """y [..., out] = x [..., in] @ w for a float w [in, out], or an `Fp8Weight` holding [out, in]."""
    if isinstance(w, Fp8Weight):
        return linear_nt(x, w, backend=backend)
    if isinstance(w, Fp8Train):
        return fp8_linear(x, w.w.T.astype(x.dtype), backend=backend)
    return x @ w.astype(x.dtype)


def in_out_shape(w) -> tuple[int, int]:
    """(in, out) of a `linear` weight: float [in, out], Fp8Weight [out, in]."""
    if isinstance(w, Fp8Weight):
        return w.shape[-1], w.shape[-2]
    return tuple(w.shape)


def as_float(w, dtype=jnp.float32) -> jax.Array:
    """A `linear` weight as a float [in, out] matrix (FP8 dequantised): for the small weights that are
    folded into other matmuls rather than run as GEMMs (MLA's absorbed W_UK, W_UV)."""
    if isinstance(w, Fp8Weight):
        return w.dequantize(dtype).T
    if isinstance(w, Fp8Train):
        return w.w.astype(dtype)
    return w.astype(dtype)


def _out_dtype(x):
    name = jnp.dtype(x.dtype).name
    return name if name in ("bfloat16", "float16", "float32") else "float32"
