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


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny shapes, < 1 min on a CPU (dry run)")
    p.add_argument("--json", default=None, help="write the result rows to this JSON file")
    return p


def emit(name: str, rows: list[dict[str, Any]], json_path: str | None) -> None:
    """Print rows as an aligned table and optionally write {meta, rows} JSON."""
    if rows:
        cols = list(rows[0])
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
