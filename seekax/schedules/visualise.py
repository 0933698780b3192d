"""Draw a schedule as per-rank timelines: SVG (hand-written, no dependencies), PNG (matplotlib), HTML, terminal.

Layout follows the DualPipe README figures: one lane per rank, time to the right, one box per compute op
coloured by kind and chunk (for DualPipe chunk 0 = the stream entering at rank 0, chunk 1 = the other),
the micro-batch number inside, idle time left as empty lane (the bubbles).
"""

from __future__ import annotations

import dataclasses
import html
from typing import Mapping

from seekax.ir.schedule import UNIT_COSTS, Schedule, SimResult

# (kind, chunk parity) -> fill colour. Forward light, input-grad backward dark, full backward mid, W green.
COLOURS: dict[tuple[str, int], str] = {
    ("F", 0): "#f8cbad", ("F", 1): "#bdd7ee",
    ("B", 0): "#c55a11", ("B", 1): "#2e75b6",
    ("BW", 0): "#e07b39", ("BW", 1): "#5b9bd5",
    ("W", 0): "#a9d18e", ("W", 1): "#548235",
}
LABELS = {"F": "forward", "B": "backward (input grad)", "BW": "backward (full)", "W": "backward (weight grad)"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Box:
    """One compute op drawn on lane `rank` from `start` to `end`; F&BW ops have two parts."""

    rank: int
    start: float
    end: float
    label: str
    parts: tuple[tuple[str, int, int], ...]  # (kind, chunk, mb)


def boxes(schedule: Schedule, costs: Mapping[str, float] | None = None) -> tuple[list[Box], SimResult]:
    s = schedule.compute_only()
    sim = s.simulate(costs)
    out = [Box(rank=r, start=sim.start[r][i], end=sim.finish[r][i], label=str(op), parts=op.parts())
           for r, ops in enumerate(s.ranks) for i, op in enumerate(ops)]
    return out, sim


def _fill(kind: str, chunk: int) -> str:
    return COLOURS[(kind, chunk % 2)]


def _text_colour(kind: str, chunk: int) -> str:
    return "#ffffff" if kind == "B" or (kind == "W" and chunk % 2) else "#000000"


def to_svg(schedule: Schedule, costs: Mapping[str, float] | None = None, *, title: str | None = None,
           unit: float = 22.0, lane: float = 26.0) -> str:
    """SVG text. Structure (relied on by tests): <g class="lane" data-rank=r> per rank holding one
    <g class="op" data-op="0F3"> per compute op."""
    bx, sim = boxes(schedule, costs)
    n = schedule.num_ranks
    left, top = 70.0, 44.0
    width = left + sim.makespan * unit + 20
    legend_y = top + n * lane + 34
    chunks = sorted({c for b in bx for _, c, _ in b.parts} or {0})[:2]
    kinds = [k for k in ("F", "B", "BW", "W") if any(p[0] == k for b in bx for p in b.parts)]
    pairs = any(len(b.parts) == 2 for b in bx)
    width = max(width, left + (len(kinds) + pairs) * 245)
    height = legend_y + 18 * len(chunks) + 12
    title = title or (f"{schedule.name}: {n} ranks, {schedule.num_microbatches} micro-batches — makespan "
                      f"{sim.makespan:g}, bubble per rank {max(sim.bubble):g}")
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
         f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
         '<rect width="100%" height="100%" fill="#ffffff"/>',
         f'<text x="{left}" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    for r in range(n):
        y = top + r * lane
        o.append(f'<g class="lane" data-rank="{r}">')
        o.append(f'<text x="{left - 8}" y="{y + lane / 2 + 4}" text-anchor="end">rank {r}</text>')
        o.append(f'<rect class="idle" x="{left}" y="{y + 1}" width="{sim.makespan * unit:.1f}" height="{lane - 2}" '
                 f'fill="#f2f2f2"/>')
        for b in (b for b in bx if b.rank == r):
            label = html.escape(b.label, quote=True)
            o.append(f'<g class="op" data-op="{label}"><title>{label} [{b.start:g}, {b.end:g})</title>')
            span = (b.end - b.start) / len(b.parts)
            for i, (kind, chunk, mb) in enumerate(b.parts):
                x = left + (b.start + i * span) * unit
                w = span * unit
                o.append(f'<rect x="{x:.1f}" y="{y + 1}" width="{w:.1f}" height="{lane - 2}" '
                         f'fill="{_fill(kind, chunk)}" stroke="#404040" stroke-width="0.6"/>')
                o.append(f'<text x="{x + w / 2:.1f}" y="{y + lane / 2 + 4}" text-anchor="middle" '
                         f'fill="{_text_colour(kind, chunk)}">{mb}</text>')
            if len(b.parts) == 2:  # outline the overlapped pair as one op
                o.append(f'<rect x="{left + b.start * unit:.1f}" y="{y + 1}" width="{(b.end - b.start) * unit:.1f}" '
                         f'height="{lane - 2}" fill="none" stroke="#000000" stroke-width="1.6"/>')
            o.append("</g>")
        o.append("</g>")
    axis_y = top + n * lane + 4
    step = max(1, int(round(sim.makespan / 20)))
    o.append('<g class="axis">')
    t = 0
    while t <= sim.makespan:
        x = left + t * unit
        o.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#000"/>'
                 f'<text x="{x:.1f}" y="{axis_y + 15}" text-anchor="middle">{t}</text>')
        t += step
    o.append("</g>")
    o.append('<g class="legend">')
    for col, kind in enumerate(kinds):
        for row, c in enumerate(chunks):
            x, y = left + col * 245, legend_y + row * 18
            o.append(f'<rect x="{x}" y="{y}" width="14" height="14" fill="{_fill(kind, c)}" stroke="#404040"/>'
                     f'<text x="{x + 18}" y="{y + 11}">{LABELS[kind]}, chunk {c}</text>')
    if pairs:
        x = left + len(kinds) * 245
        o.append(f'<rect x="{x}" y="{legend_y}" width="14" height="14" fill="none" stroke="#000" stroke-width="1.6"/>'
                 f'<text x="{x + 18}" y="{legend_y + 11}">overlapped F&amp;B pair</text>')
    o.append("</g></svg>")
    return "\n".join(o)


def to_png(schedule: Schedule, path: str, costs: Mapping[str, float] | None = None, *, dpi: int = 110,
           progress: bool = False) -> None:
    """The same picture through matplotlib (Agg). progress: a bar on stderr over the boxes, then the render
    (a picture of 10,000 ops takes about half a minute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle
    from tqdm import tqdm

    bx, sim = boxes(schedule, costs)
    n = schedule.num_ranks
    lanes, legend, margin = 0.4 * n, 0.75, 0.45     # inches: the lanes, the legend band, title / axis label
    height = lanes + legend + 2 * margin + 0.25
    fig, ax = plt.subplots(figsize=(max(8.0, sim.makespan * 0.22), height))
    fig.subplots_adjust(left=0.07, right=0.99, bottom=(legend + margin + 0.25) / height, top=1 - margin / height)
    for r in range(n):
        ax.add_patch(Rectangle((0, r - 0.45), sim.makespan, 0.9, color="#f2f2f2", zorder=0))
    bar = tqdm(total=len(bx), desc="draw PNG", unit="op", disable=not progress)
    for b in bx:
        bar.update()
        span = (b.end - b.start) / len(b.parts)
        for i, (kind, chunk, mb) in enumerate(b.parts):
            x = b.start + i * span
            ax.add_patch(Rectangle((x, b.rank - 0.45), span, 0.9, facecolor=_fill(kind, chunk), edgecolor="#404040",
                                   linewidth=0.5))
            ax.text(x + span / 2, b.rank, str(mb), ha="center", va="center", fontsize=7,
                    color=_text_colour(kind, chunk))
        if len(b.parts) == 2:
            ax.add_patch(Rectangle((b.start, b.rank - 0.45), b.end - b.start, 0.9, fill=False, edgecolor="black",
                                   linewidth=1.4))
    ax.set_xlim(0, sim.makespan)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
    ax.set_xlabel("time (cost units)")
    ax.set_title(f"{schedule.name}: {n} ranks, {schedule.num_microbatches} micro-batches — makespan "
                 f"{sim.makespan:g}, bubble per rank {max(sim.bubble):g}", fontsize=10)
    kinds = [k for k in ("F", "B", "BW", "W") if any(p[0] == k for b in bx for p in b.parts)]
    chunks = sorted({c for b in bx for _, c, _ in b.parts})[:2]
    handles = [Patch(facecolor=_fill(k, c), edgecolor="#404040", label=f"{LABELS[k]}, chunk {c}")
               for k in kinds for c in chunks]
    handles.append(Patch(facecolor="none", edgecolor="black", label="overlapped F&B pair"))
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles)),
               fontsize=7, frameon=False)
    bar.set_description("render PNG")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # the legend below the axes stays in the picture
    bar.close()
    plt.close(fig)


def to_html(schedule: Schedule, costs: Mapping[str, float] | None = None) -> str:
    """A standalone page: the SVG and the per-rank numbers."""
    svg = to_svg(schedule, costs)
    sim = schedule.compute_only().simulate(costs)
    rows = "".join(f"<tr><td>{r}</td><td>{sim.busy[r]:g}</td><td>{sim.bubble[r]:g}</td>"
                   f"<td>{sim.peak_activations[r]}</td></tr>" for r in range(schedule.num_ranks))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{schedule.name}</title></head><body>"
            f"{svg}<table border='1' cellpadding='3'><tr><th>rank</th><th>busy</th><th>bubble</th>"
            f"<th>peak activations</th></tr>{rows}</table></body></html>")


def to_text(schedule: Schedule, costs: Mapping[str, float] | None = None, *, width: int = 4) -> str:
    """Terminal view: one row per rank, `width` characters per cost unit, '.' where the rank is idle."""
    bx, sim = boxes(schedule, costs)
    total = int(round(sim.makespan * width))
    lines = []
    for r in range(schedule.num_ranks):
        row = ["."] * total
        for b in (b for b in bx if b.rank == r):
            a, e = int(round(b.start * width)), int(round(b.end * width))
            text = (b.label + " " * (e - a))[: max(e - a - 1, 1)] + "|"
            row[a:e] = list(text[: e - a])
        lines.append(f"rank {r:>2} " + "".join(row))
    return "\n".join(lines)


def default_costs(text: str | None) -> dict[str, float]:
    """Parse "F,B,W[,FB]" (B = input-grad backward; full backward = B + W; FB defaults to F + B + W)."""
    if not text:
        return dict(UNIT_COSTS)
    from seekax.ir.validate import fail

    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise fail("costs", text, "numbers F,B,W[,FB]") from None
    if len(vals) not in (3, 4) or any(v < 0 for v in vals):
        raise fail("costs", text, "three or four non-negative numbers F,B,W[,FB]")
    f, b, w = vals[:3]
    fb = vals[3] if len(vals) == 4 else f + b + w
    return {"F": f, "B": b, "W": w, "BW": b + w, "F&BW": fb}
