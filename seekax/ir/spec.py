"""Common base of kernel specs: frozen, keyword-only, validated on construction, serialisable."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar


class KernelSpec:
    """Mixin for frozen spec dataclasses: `flops()`, `min_bytes()`, a stable `key()` for caches."""

    op: ClassVar[str] = "kernel"

    def flops(self) -> float:  # pragma: no cover - every spec overrides
        raise NotImplementedError

    def min_bytes(self) -> float:  # pragma: no cover - every spec overrides
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def key(self) -> str:
        """Stable identity used by the config cache: op name + sorted fields."""
        return self.op + ":" + json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def floor_seconds(self, device, dtype: str | None = None) -> float:
        """Roofline floor on `device` (an `ir.device.DeviceSpec`)."""
        return device.floor_seconds(self.flops(), self.min_bytes(), dtype or self.compute_dtype)

    @property
    def compute_dtype(self) -> str:  # pragma: no cover - overridden
        return "bfloat16"
