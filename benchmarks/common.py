"""Shared benchmark plumbing: median timing of jitted calls, result rows, JSON output."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from typing import Any, Callable

import jax


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 2, iters: int = 10) -> float:
    """Median wall seconds of `fn(*args)` with results synchronised (compile and warm-up excluded)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def device_time(fn: Callable[..., Any], *args: Any, iters: int = 10, warmup: int = 2) -> float:
    """Median seconds per call: the summed device time of every kernel one call launches (CUPTI, through Mosaic
    GPU's profiler, which runs one untimed warm-up call first) on a GPU, so launch and host overheads stay
    out; synchronised wall time elsewhere."""
    if on_gpu():
        from jax.experimental.mosaic.gpu import profiler

        _, ms = profiler.measure(fn, iterations=max(2, iters))(*args)
        if ms is not None:
            return statistics.median(ms) / 1e3
    return time_fn(fn, *args, warmup=warmup, iters=iters)


L2_BYTES = 60 << 20  # H200's L2 (H100: 50 MiB); working sets under ~3x this would be timed from the cache


def cold_l2_time(fn: Callable[..., Any], args: tuple, bytes_per_call: int, *, iters: int = 10,
                 max_sets: int = 16) -> float:
    """`device_time` of `fn(*args)` with the L2 cache cold, as DeepGEMM's and FlashMLA's benchmarks flush it:
    on a GPU, one jitted call runs `fn` over n distinct copies of `args` (n * bytes_per_call >= 3x L2, at most
    `max_sets`), and the time is divided by n. Returns seconds per call."""
    n = 1
    if on_gpu():
        n = max(1, min(max_sets, -(-3 * L2_BYTES // max(1, bytes_per_call))))
    if n == 1:
        return device_time(fn, *args, iters=iters)
    import jax.numpy as jnp

    sets = [args] + [tuple(jnp.copy(x) if isinstance(x, jax.Array) else x for x in args) for _ in range(n - 1)]
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    return device_time(many, sets, iters=iters) / n


def rel_err(got: Any, want: Any) -> float:
    """||got - want|| / ||want|| in float64 on the host: the correctness column of GPU rows."""
    import numpy as np

    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, < 1 min on a CPU (dry run)")
    p.add_argument("--json", default=None, help="write the result rows to this JSON file")
    return p


def emit(name: str, rows: list[dict[str, Any]], json_path: str | None) -> None:
    """Print rows as an aligned table and optionally write {meta, rows} JSON."""
    if rows:
        cols = list(dict.fromkeys(c for r in rows for c in r))  # every row's columns, first seen first
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    if json_path:
        meta = {"benchmark": name, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "device": device_name(), "jax": jax.__version__, "host": platform.node()}
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def save_partial(name: str, rows: list[dict[str, Any]], json_path: str | None) -> None:
    """Write the rows so far (no table): what finished survives a benchmark stopped at its time limit."""
    if json_path:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            emit(name, rows, json_path)
