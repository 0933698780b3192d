"""bf16 NT matmul: the Mosaic GPU kernel vs XLA's dot in the same run (TFLOPS, fraction of the floor).

Timing (`common.device_time`): CUPTI kernel time on a GPU, wall time on a CPU; `err_vs_xla` checks the kernel's
result against XLA's on the hardware.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_time, emit, parser, rel_err  # noqa: E402

from seekax.ir import H200, GemmSpec  # noqa: E402
from seekax.ir.device import is_hopper  # noqa: E402
from seekax.ops.matmul import matmul_nt  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    gpu = is_hopper()
    big = [(4096, 4096, 4096), (8192, 8192, 8192), (4096, 7168, 2048)]
    shapes = [(256, 256, 256)] if args.quick or not gpu else big
    rows = []
    for m, n, k in shapes:
        spec = GemmSpec(m=m, n=n, k=k)
        key_a, key_b = jax.random.split(jax.random.key(m + n + k))
        a = jax.random.normal(key_a, (m, k), jnp.bfloat16)
        b = jax.random.normal(key_b, (n, k), jnp.bfloat16)
        xla = jax.jit(functools.partial(matmul_nt, backend="xla"))
        t_xla = device_time(xla, a, b)
        row = {"m": m, "n": n, "k": k, "xla_tflops": spec.flops() / t_xla / 1e12}
        if gpu:
            mosaic = jax.jit(functools.partial(matmul_nt, backend="mosaic"))
            t = device_time(mosaic, a, b)
            row.update(mosaic_us=t * 1e6, mosaic_tflops=spec.flops() / t / 1e12,
                       frac_of_floor=spec.floor_seconds(H200) / t, speedup_vs_xla=t_xla / t,
                       err_vs_xla=rel_err(mosaic(a, b), xla(a, b)))
        print(row, flush=True)
        rows.append(row)
    emit("matmul", rows, args.json)


if __name__ == "__main__":
    main()
