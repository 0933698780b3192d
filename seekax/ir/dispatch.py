"""Expert-parallel dispatch spec (DeepEP): tokens routed to top_k of num_experts spread over ep_size ranks."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from seekax.ir.fp8 import FP8_DTYPE, SCALE_BLOCK
from seekax.ir.spec import KernelSpec
from seekax.ir.validate import canonical_dtype, check_int, fail


@dataclasses.dataclass(frozen=True, kw_only=True)
class DispatchSpec(KernelSpec):
    """Per rank: x [tokens, hidden], topk_idx [tokens, top_k] over num_experts (num_experts / ep_size local)."""

    op: ClassVar[str] = "dispatch"
    tokens: int
    hidden: int
    num_experts: int
    top_k: int
    ep_size: int
    dtype: str = "bfloat16"
    capacity: int | None = None  # received tokens per (source rank) in the padded mode; None = worst case

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("tokens", check_int("tokens", self.tokens))
        set_("hidden", check_int("hidden", self.hidden, min_value=1))
        set_("num_experts", check_int("num_experts", self.num_experts, min_value=1))
        set_("top_k", check_int("top_k", self.top_k, min_value=1))
        set_("ep_size", check_int("ep_size", self.ep_size, min_value=1))
        if self.top_k > self.num_experts:
            raise fail("top_k", self.top_k, f"<= num_experts={self.num_experts}")
        if self.num_experts % self.ep_size:
            raise fail("num_experts", self.num_experts, f"a multiple of ep_size={self.ep_size}")
        set_("dtype", canonical_dtype("dtype", self.dtype, ("bfloat16", "float16", "float32", FP8_DTYPE)))
        if self.capacity is not None:
            set_("capacity", check_int("capacity", self.capacity))

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def compute_dtype(self) -> str:
        return "bfloat16"

    def flops(self) -> float:
        return 0.0

    def payload_bytes_per_token(self) -> int:
        item = np.dtype(self.dtype).itemsize
        scales = 4 * -(-self.hidden // SCALE_BLOCK) if item == 1 else 0
        return self.hidden * item + scales

    def min_bytes(self) -> float:
        """Bytes each rank sends in dispatch plus receives in combine, with at most one copy per
        destination rank (DeepEP's dedup), bounded by min(top_k, ep_size) copies per token."""
        copies = min(self.top_k, self.ep_size)
        return 2.0 * self.tokens * copies * self.payload_bytes_per_token()
