"""Device ceilings for roofline floors: datasheet peaks and the ceilings measured on our machines.

Benchmarks report `achieved / floor`, where floor = max(flops / peak_flops, bytes / bandwidth) on the
*measured* ceilings (datasheet numbers are leads, not ceilings).
"""

from __future__ import annotations

import dataclasses

from seekax.ir.validate import fail


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator kind. Rates in FLOP/s and bytes/s; memory in bytes."""

    name: str
    sm_count: int
    smem_per_block: int            # opt-in dynamic shared memory per thread block (bytes)
    memory_bytes: int
    datasheet_hbm_bandwidth: float
    datasheet_bf16_flops: float    # dense
    datasheet_fp8_flops: float     # dense
    measured_copy_bandwidth: float | None = None  # device-to-device copy, bytes read + written per second
    measured_bf16_flops: float | None = None      # large random bf16 matmul
    notes: str = ""

    @property
    def hbm_bandwidth(self) -> float:
        """Bandwidth ceiling used for floors: measured when we have it, else the datasheet."""
        return self.measured_copy_bandwidth or self.datasheet_hbm_bandwidth

    @property
    def bf16_flops(self) -> float:
        return self.measured_bf16_flops or self.datasheet_bf16_flops

    @property
    def fp8_flops(self) -> float:
        """FP8 dense ceiling: the datasheet ratio fp8/bf16 (2x) applied to the measured bf16 rate."""
        if self.measured_bf16_flops:
            return self.measured_bf16_flops * (self.datasheet_fp8_flops / self.datasheet_bf16_flops)
        return self.datasheet_fp8_flops

    def peak_flops(self, dtype: str) -> float:
        if dtype in ("float8_e4m3fn", "float8_e5m2"):
            return self.fp8_flops
        if dtype in ("bfloat16", "float16"):
            return self.bf16_flops
        raise fail("dtype", dtype, "float8_e4m3fn, float8_e5m2, bfloat16 or float16")

    def floor_seconds(self, flops: float, min_bytes: float, dtype: str) -> float:
        """Roofline floor: no implementation runs much faster than this."""
        return max(flops / self.peak_flops(dtype), min_bytes / self.hbm_bandwidth)


H100 = DeviceSpec(
    name="H100-SXM",
    sm_count=132,
    smem_per_block=227 * 1024,
    memory_bytes=80 * 2**30,
    datasheet_hbm_bandwidth=3.35e12,
    datasheet_bf16_flops=989e12,
    datasheet_fp8_flops=1979e12,
    notes="datasheet only; no H100 measured here",
)

H200 = DeviceSpec(
    name="H200",
    sm_count=132,
    smem_per_block=227 * 1024,
    memory_bytes=141 * 10**9,
    datasheet_hbm_bandwidth=4.8e12,
    datasheet_bf16_flops=989e12,
    datasheet_fp8_flops=1979e12,
    # Measured on the lent H200 (device tool, 2026-10-28 / 2026-11-04): D2D copy ~4.3 TB/s
    # (read + write), 8192^3 bf16 matmul 769-798 TFLOP/s on random data.
    measured_copy_bandwidth=4.3e12,
    measured_bf16_flops=790e12,
)

DEVICES = {"h100": H100, "h200": H200}


def get_device(name: str) -> DeviceSpec:
    key = name.lower().replace("-sxm", "").replace("nvidia ", "").strip()
    if key not in DEVICES:
        raise fail("device", name, f"one of {sorted(DEVICES)}")
    return DEVICES[key]


def detect_device() -> DeviceSpec | None:
    """The DeviceSpec of jax's first device if it is a known Hopper GPU, else None."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return None
    kind = dev.device_kind.lower()
    for key, spec in DEVICES.items():
        if key in kind:
            return spec
    return None


def is_hopper() -> bool:
    """True when jax's default device is an sm_90 GPU (the Mosaic kernels' target)."""
    import jax

    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") in ("9.0", "9.0a")
