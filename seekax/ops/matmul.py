"""`matmul_nt`: the bf16/f16 Hopper matmul (Mosaic GPU) behind one validated call, with the XLA reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seekax.ir.config_cache import pick_config
from seekax.ir.gemm import GemmSpec
from seekax.ir.tiling import GemmTileConfig, choose_gemm_config
from seekax.ir.validate import fail
from seekax.lowering.backend import num_sms_for, run_kernel, run_op
from seekax.lowering.reference import matmul as ref


def validate_matmul_nt(a, b, out_dtype) -> GemmSpec:
    """The one validation point for every backend: ranks, K-major B, matching K and dtypes."""
    if getattr(a, "ndim", None) != 2:
        raise fail("a.shape", getattr(a, "shape", None), "[M, K]")
    if getattr(b, "ndim", None) != 2:
        raise fail("b.shape", getattr(b, "shape", None), "[N, K] (K-major)")
    if a.shape[1] != b.shape[1]:
        raise fail("b.shape", tuple(b.shape), f"[N, K] with K={a.shape[1]} matching a.shape={tuple(a.shape)}")
    out = a.dtype if out_dtype is None else out_dtype
    return GemmSpec(m=a.shape[0], n=b.shape[0], k=a.shape[1], a_dtype=np.dtype(a.dtype).name,
                    b_dtype=np.dtype(b.dtype).name, out_dtype=np.dtype(out).name)


def matmul_nt(a: jax.Array, b: jax.Array, *, out_dtype=None, config: GemmTileConfig | None = None,
              backend: str = "auto", num_sms: int | None = None) -> jax.Array:
    """out[M, N] = a[M, K] @ b[N, K]^T with fp32 accumulation, in out_dtype (default a.dtype).

    backend: "mosaic" (Hopper), "interpret" (the same kernel on the CPU interpreter), "xla" (reference),
    "auto" (the kernel on sm_90 when it takes the shape, else xla). The kernel takes bf16/f16 with M > 0 and
    M, N, K multiples of its tile (N of 16 at least); any other valid shape runs on xla under "auto".
    config: explicit tile config, else the autotuned winner cached for this spec on this device, else the
    heuristic's.
    """
    spec = validate_matmul_nt(a, b, out_dtype)
    out_dtype = jnp.dtype(spec.out_dtype)

    def kernel(backend):
        from seekax.lowering.mosaic import matmul_sm90

        cfg = pick_config(config, spec_key=spec.key(), from_dict=GemmTileConfig.from_dict,
                          heuristic=lambda: choose_gemm_config(spec.m, spec.n, spec.k, spec.a_dtype, spec.out_dtype),
                          use_cache=backend == "mosaic")
        built = matmul_sm90.build(spec.m, spec.n, spec.k, a.dtype, out_dtype, cfg, num_sms or num_sms_for(backend))
        return run_kernel(built, a, b, backend=backend)

    return run_op(backend, kernel=kernel, reference=lambda: ref.matmul_nt(a, b, out_dtype=out_dtype), name="matmul_nt")
