"""GEMM specs (dense and MoE-grouped), optionally FP8 with DeepGEMM's fine-grained block scales."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np

from seekax.ir.fp8 import ACT_BLOCK, SCALE_BLOCK, WEIGHT_BLOCK
from seekax.ir.spec import KernelSpec
from seekax.ir.validate import canonical_dtype, check_choice, check_int, fail

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
IN_DTYPES = ("bfloat16", "float16") + FP8_DTYPES
OUT_DTYPES = ("bfloat16", "float16", "float32")


def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def _check_accumulate(accumulate, out_dtype: str) -> None:
    if not isinstance(accumulate, bool):
        raise fail("accumulate", accumulate, "a bool")
    if accumulate and out_dtype != "float32":
        raise fail("out_dtype", out_dtype, '"float32" when accumulating into c (c and the output are float32)')


def _check_scale(name: str, value, is_fp8: bool) -> tuple[int, int] | None:
    if not is_fp8:
        if value is not None:
            raise fail(name, value, "None for non-FP8 operands")
        return None
    if value is None:
        raise fail(name, value, f"a (rows, cols) block shape for FP8 operands, e.g. {ACT_BLOCK} or {WEIGHT_BLOCK}")
    value = tuple(value)
    if value not in (ACT_BLOCK, WEIGHT_BLOCK):
        raise fail(name, value, f"{ACT_BLOCK} or {WEIGHT_BLOCK}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmSpec(KernelSpec):
    """out[m, n] = sum_k a[m, k] * b[n, k] (layout "nt": both operands K-major, as FP8 wgmma needs), plus a
    float32 c[m, n] when `accumulate`."""

    op: ClassVar[str] = "gemm"
    m: int
    n: int
    k: int
    a_dtype: str = "bfloat16"
    b_dtype: str = "bfloat16"
    out_dtype: str = "bfloat16"
    a_scale: tuple[int, int] | None = None
    b_scale: tuple[int, int] | None = None
    layout: str = "nt"
    accumulate: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("m", check_int("m", self.m))
        set_("n", check_int("n", self.n, min_value=1))
        set_("k", check_int("k", self.k, min_value=1))
        set_("a_dtype", canonical_dtype("a_dtype", self.a_dtype, IN_DTYPES))
        set_("b_dtype", canonical_dtype("b_dtype", self.b_dtype, IN_DTYPES))
        set_("out_dtype", canonical_dtype("out_dtype", self.out_dtype, OUT_DTYPES))
        if (self.a_dtype in FP8_DTYPES) != (self.b_dtype in FP8_DTYPES):
            raise fail("b_dtype", self.b_dtype, f"FP8 or not FP8 like a_dtype={self.a_dtype!r}")
        if self.a_dtype not in FP8_DTYPES and self.a_dtype != self.b_dtype:
            raise fail("b_dtype", self.b_dtype, f"the same dtype as a_dtype={self.a_dtype!r}")
        set_("a_scale", _check_scale("a_scale", self.a_scale, self.is_fp8))
        set_("b_scale", _check_scale("b_scale", self.b_scale, self.is_fp8))
        check_choice("layout", self.layout, ("nt", "nn", "tn"))
        if self.is_fp8 and self.layout != "nt":
            raise fail("layout", self.layout, '"nt" for FP8 (Hopper FP8 wgmma needs K-major A and B)')
        _check_accumulate(self.accumulate, self.out_dtype)

    @property
    def is_fp8(self) -> bool:
        return self.a_dtype in FP8_DTYPES

    @property
    def compute_dtype(self) -> str:
        return self.a_dtype

    def scale_bytes(self) -> int:
        if not self.is_fp8:
            return 0
        kb = math.ceil(self.k / SCALE_BLOCK)
        a = math.ceil(self.m / self.a_scale[0]) * kb
        b = math.ceil(self.n / self.b_scale[0]) * kb
        return 4 * (a + b)

    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k

    def min_bytes(self) -> float:
        c = 4 * self.m * self.n if self.accumulate else 0
        return (self.m * self.k * _itemsize(self.a_dtype) + self.n * self.k * _itemsize(self.b_dtype)
                + self.m * self.n * _itemsize(self.out_dtype) + self.scale_bytes() + c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupedGemmSpec(KernelSpec):
    """MoE grouped GEMM.

    layout "contiguous": a [m, k] rows sorted by group (m = total rows), b [G, n, k].
    layout "masked":     a [G, m, k] fixed buffers (m = max rows per group), b [G, n, k]; `expected_m`
                         rows per group are valid on average (DeepEP low-latency decode).
    layout "k_grouped":  weight gradients: a [k, m], b [k, n] with k split in G groups -> out [G, m, n]; with
                         `accumulate`, plus a float32 c [G, m, n].
    """

    op: ClassVar[str] = "grouped_gemm"
    num_groups: int
    m: int
    n: int
    k: int
    layout: str = "contiguous"
    a_dtype: str = "float8_e4m3fn"
    b_dtype: str = "float8_e4m3fn"
    out_dtype: str = "bfloat16"
    alignment: int = 128
    expected_m: int | None = None
    accumulate: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("num_groups", check_int("num_groups", self.num_groups, min_value=1))
        set_("m", check_int("m", self.m))
        set_("n", check_int("n", self.n, min_value=1))
        set_("k", check_int("k", self.k, min_value=1))
        check_choice("layout", self.layout, ("contiguous", "masked", "k_grouped"))
        set_("a_dtype", canonical_dtype("a_dtype", self.a_dtype, IN_DTYPES))
        set_("b_dtype", canonical_dtype("b_dtype", self.b_dtype, IN_DTYPES))
        set_("out_dtype", canonical_dtype("out_dtype", self.out_dtype, OUT_DTYPES))
        if (self.a_dtype in FP8_DTYPES) != (self.b_dtype in FP8_DTYPES):
            raise fail("b_dtype", self.b_dtype, f"FP8 or not FP8 like a_dtype={self.a_dtype!r}")
        set_("alignment", check_int("alignment", self.alignment, min_value=1))
        if self.expected_m is not None:
            set_("expected_m", check_int("expected_m", self.expected_m))
            if self.layout == "masked" and self.expected_m > self.m:
                raise fail("expected_m", self.expected_m, f"<= m={self.m} (the per-group buffer size)")
        _check_accumulate(self.accumulate, self.out_dtype)
        if self.accumulate and self.layout != "k_grouped":
            raise fail("accumulate", self.accumulate, 'False unless layout="k_grouped" (the layout that adds c)')

    @property
    def is_fp8(self) -> bool:
        return self.a_dtype in FP8_DTYPES

    @property
    def compute_dtype(self) -> str:
        return self.a_dtype

    def valid_rows(self) -> int:
        """Rows of A that carry real tokens, summed over groups."""
        if self.layout == "masked":
            per = self.m if self.expected_m is None else self.expected_m
            return per * self.num_groups
        return self.m

    def flops(self) -> float:
        if self.layout == "k_grouped":
            return 2.0 * self.m * self.n * self.k
        return 2.0 * self.valid_rows() * self.n * self.k

    def min_bytes(self) -> float:
        ai, bi, oi = _itemsize(self.a_dtype), _itemsize(self.b_dtype), _itemsize(self.out_dtype)
        fp8 = self.is_fp8
        if self.layout == "k_grouped":
            scales = 4 * math.ceil(self.k / SCALE_BLOCK) * (self.m + self.n) if fp8 else 0
            c = 4 * self.num_groups * self.m * self.n if self.accumulate else 0
            return self.k * (self.m * ai + self.n * bi) + self.num_groups * self.m * self.n * oi + scales + c
        rows = self.valid_rows()
        kb = math.ceil(self.k / SCALE_BLOCK)
        scales = 4 * kb * (rows + self.num_groups * math.ceil(self.n / SCALE_BLOCK)) if fp8 else 0
        return rows * self.k * ai + self.num_groups * self.n * self.k * bi + rows * self.n * oi + scales
