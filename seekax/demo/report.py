"""Demo report: loss curve, schedule picture and EPLB balance chart (PNG), summary JSON and text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def loss_curve(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title("tiny DeepSeek-V3: DualPipeV x EP training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def eplb_chart(records: list[dict[str, Any]], path: Path) -> None:
    """Per-layer max/mean GPU load before and after each rebalance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    if records:
        layers = len(records[0]["max_over_mean_before"])
        x = np.arange(layers)
        w = 0.8 / (2 * len(records))
        for i, r in enumerate(records):
            ax.bar(x + (2 * i) * w, r["max_over_mean_before"], w, color="#c55a11", alpha=0.5 + 0.5 * i / len(records),
                   label="before" if i == 0 else None)
            ax.bar(x + (2 * i + 1) * w, r["max_over_mean_after"], w, color="#2e75b6",
                   alpha=0.5 + 0.5 * i / len(records), label="after" if i == 0 else None)
        ax.set_xticks(x + 0.4 - w / 2, [f"MoE #{i}" for i in range(layers)])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("max / mean GPU load")
    ax.set_title("EPLB rebalances (each pair: one rebalance)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_summary(report_dir: Path, summary: dict[str, Any]) -> str:
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["seekax demo summary"]
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], float):
            v = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        lines.append(f"  {k:<32} {v}")
    text = "\n".join(lines)
    (report_dir / "summary.txt").write_text(text + "\n")
    return text
