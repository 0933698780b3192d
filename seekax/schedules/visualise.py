"""Draw a schedule as per-rank timelines: SVG (hand-written, no dependencies), PNG (matplotlib), HTML, terminal.

Layout follows the DualPipe README figures: one lane per rank, time to the right, one box per compute op, the
micro-batch number inside, idle time left as empty lane (the bubbles). The op kind is its hue (forward blue,
input-grad backward orange, full backward magenta, weight grad green); the chunk is its shade, and odd chunks
(DualPipe's second stream, DualPipeV's way back up) are hatched as well. An overlapped F&B is one outlined
box whose halves are as long as their costs. With communication-aware costs (`CommCosts`) each rank gets a
second, thinner row under its lane for its all-to-alls, and an F&B is drawn sub-step by sub-step. The legend
sits right under the lanes (the time axis is above them) and lists only what the picture holds.

The terminal view puts time down the rows and ranks in columns when the ranks fit the width, else one row per
rank with time to the right.
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

from seekax.ir.schedule import UNIT_COSTS, Schedule, SimResult

# (kind, chunk parity) -> fill colour: one hue per kind, light for even chunks and dark for odd ones.
COLOURS: dict[tuple[str, int], str] = {
    ("F", 0): "#9ecae1", ("F", 1): "#3182bd",
    ("B", 0): "#fdae6b", ("B", 1): "#e6550d",
    ("BW", 0): "#f1b6da", ("BW", 1): "#c51b7d",
    ("W", 0): "#a1d99b", ("W", 1): "#31a354",
}
LABELS = {"F": "forward", "B": "backward (input grad)", "BW": "backward (full)", "W": "backward (weight grad)"}
KIND_ORDER = ("F", "B", "BW", "W")
ODD_CHUNK_HATCH = "/" * 3  # matplotlib hatch of odd chunks' boxes (three diagonal strokes a cell)
TERMINAL_WIDTH = 100  # the terminal view puts ranks in columns when they fit this many characters


@dataclasses.dataclass(frozen=True)
class Piece:
    """A drawn piece of an op: its (kind, chunk, mb), absolute times, and whether it is communication."""

    kind: str
    chunk: int
    mb: int
    start: float
    end: float
    comm: bool = False
    name: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Box:
    """One compute op drawn on lane `rank` from `start` to `end`; F&BW ops have two parts; pieces are what is
    drawn (one per part, in proportion to the parts' costs, or one per sub-step with CommCosts)."""

    rank: int
    start: float
    end: float
    label: str
    parts: tuple[tuple[str, int, int], ...]  # (kind, chunk, mb)
    pieces: tuple[Piece, ...] = ()


def boxes(schedule: Schedule, costs: Any = None) -> tuple[list[Box], SimResult]:
    """The boxes of every compute op at its simulated time. costs: a per-kind mapping or `CommCosts`."""
    s = schedule.compute_only()
    sim = s.simulate(costs)
    out = []
    for r, ops in enumerate(s.ranks):
        for i, op in enumerate(ops):
            t0, t1 = sim.start[r][i], sim.finish[r][i]
            out.append(Box(rank=r, start=t0, end=t1, label=str(op), parts=op.parts(),
                           pieces=_pieces(op, t0, t1, costs)))
    return out, sim


def _pieces(op, t0: float, t1: float, costs: Any) -> tuple[Piece, ...]:
    parts = op.parts()
    if hasattr(costs, "timeline"):  # CommCosts: every sub-step at its time, communication flagged
        f_part, b_part = (parts[0], parts[-1]) if len(parts) == 2 else (parts[0], parts[0])
        return tuple(Piece(*(f_part if p.part == "F" else b_part), t0 + p.start, t0 + p.end, p.comm, p.name)
                     for p in costs.timeline(op.kind) if p.end > p.start)
    if len(parts) == 1:
        return (Piece(*parts[0], t0, t1),)
    c = dict(UNIT_COSTS if costs is None else costs)
    share = c["F"] / (c["F"] + c["BW"]) if c["F"] + c["BW"] > 0 else 0.5  # the halves in proportion to costs
    mid = t0 + (t1 - t0) * share
    return (Piece(*parts[0], t0, mid), Piece(*parts[1], mid, t1))


def _fill(kind: str, chunk: int) -> str:
    return COLOURS[(kind, chunk % 2)]


def _text_colour(kind: str, chunk: int) -> str:
    return "#ffffff" if chunk % 2 else "#000000"


def _legend_entries(bx: list[Box]) -> tuple[list[tuple[str, int]], bool, bool]:
    """(kind, chunk parity) pairs drawn, whether an overlapped pair is drawn, whether communication is."""
    present = {(p.kind, p.chunk % 2) for b in bx for p in b.pieces if not p.comm}
    kinds = [(k, c) for k in KIND_ORDER for c in (0, 1) if (k, c) in present]
    return kinds, any(len(b.parts) == 2 for b in bx), any(p.comm for b in bx for p in b.pieces)


def _title(schedule: Schedule, sim: SimResult) -> str:
    text = (f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_microbatches} micro-batches — makespan "
            f"{sim.makespan:g}, bubble per rank {max(sim.bubble):g}")
    if any(sim.exposed_comm):
        text += f", exposed communication per rank {max(sim.exposed_comm):g}"
    return text


def to_svg(schedule: Schedule, costs: Any = None, *, title: str | None = None, unit: float = 22.0,
           lane: float = 26.0) -> str:
    """SVG text. Structure (relied on by tests): <g class="lane" data-rank=r> per rank holding one
    <g class="op" data-op="0F3"> per compute op; a lane's pieces are <rect class="piece"> (communication:
    class "comm"), hatching overlays <rect class="hatch">; <g class="legend"> right under the lanes."""
    bx, sim = boxes(schedule, costs)
    kinds, pairs, comm = _legend_entries(bx)
    n = schedule.num_ranks
    comm_h = lane * 0.45 if comm else 0.0
    row = lane + comm_h
    left, top = 70.0, 62.0
    lanes_end = top + n * row
    per_line = 4
    legend_items = [(k, c) for k, c in kinds] + [("pair", 0)] * pairs + [("comm", 0)] * comm
    legend_rows = -(-len(legend_items) // per_line)
    width = max(left + sim.makespan * unit + 20, left + per_line * 235)
    height = lanes_end + 10 + 18 * legend_rows + 8
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
         f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
         '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
         'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#ffffff" stroke-width="1.6" '
         'stroke-opacity="0.7"/></pattern></defs>',
         '<rect width="100%" height="100%" fill="#ffffff"/>',
         f'<text x="{left}" y="20" font-size="14" font-weight="bold">{html.escape(title or _title(schedule, sim))}'
         '</text>']
    # time axis above the lanes, so the legend can sit right under them
    axis_y = top - 8
    step = max(1, int(round(sim.makespan / 20)))
    o.append('<g class="axis">')
    t = 0
    while t <= sim.makespan:
        x = left + t * unit
        o.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" stroke="#000"/>'
                 f'<text x="{x:.1f}" y="{axis_y - 3}" text-anchor="middle">{t}</text>')
        t += step
    o.append("</g>")
    for r in range(n):
        y = top + r * row
        o.append(f'<g class="lane" data-rank="{r}">')
        o.append(f'<text x="{left - 8}" y="{y + lane / 2 + 4}" text-anchor="end">rank {r}</text>')
        o.append(f'<rect class="idle" x="{left}" y="{y + 1}" width="{sim.makespan * unit:.1f}" height="{lane - 2}" '
                 f'fill="#f2f2f2"/>')
        if comm:
            o.append(f'<text x="{left - 8}" y="{y + lane + comm_h / 2 + 3}" text-anchor="end" font-size="9">'
                     'all-to-all</text>')
        for b in (b for b in bx if b.rank == r):
            label = html.escape(b.label, quote=True)
            o.append(f'<g class="op" data-op="{label}"><title>{label} [{b.start:g}, {b.end:g})</title>')
            labelled = set()
            for p in b.pieces:
                x, w = left + p.start * unit, (p.end - p.start) * unit
                py, ph = (y + lane, comm_h - 2) if p.comm else (y + 1, lane - 2)
                cls = "comm" if p.comm else "piece"
                tip = f"<title>{html.escape(p.name)}</title>" if p.name else ""
                o.append(f'<rect class="{cls}" x="{x:.1f}" y="{py:.1f}" width="{w:.1f}" height="{ph:.1f}" '
                         f'fill="{_fill(p.kind, p.chunk)}" stroke="#404040" stroke-width="0.6">{tip}</rect>')
                if p.chunk % 2:
                    o.append(f'<rect class="hatch" x="{x:.1f}" y="{py:.1f}" width="{w:.1f}" height="{ph:.1f}" '
                             'fill="url(#hatch)"/>')
                key = (p.kind, p.chunk, p.mb)
                if not p.comm and key not in labelled:  # the micro-batch number, once per part
                    labelled.add(key)
                    o.append(f'<text x="{x + w / 2:.1f}" y="{y + lane / 2 + 4}" text-anchor="middle" '
                             f'fill="{_text_colour(p.kind, p.chunk)}">{p.mb}</text>')
            if len(b.parts) == 2:  # outline the overlapped pair as one op
                o.append(f'<rect class="pair" x="{left + b.start * unit:.1f}" y="{y + 1}" '
                         f'width="{(b.end - b.start) * unit:.1f}" height="{lane - 2}" fill="none" stroke="#000000" '
                         'stroke-width="1.6"/>')
            o.append("</g>")
        o.append("</g>")
    o.append('<g class="legend">')
    for i, (k, c) in enumerate(legend_items):
        x, y = left + (i % per_line) * 235, lanes_end + 8 + (i // per_line) * 18
        if k == "pair":
            o.append(f'<rect x="{x}" y="{y}" width="14" height="14" fill="none" stroke="#000" stroke-width="1.6"/>'
                     f'<text x="{x + 18}" y="{y + 11}">overlapped F&amp;B pair</text>')
        elif k == "comm":
            o.append(f'<rect x="{x}" y="{y + 4}" width="14" height="7" fill="#cccccc" stroke="#404040"/>'
                     f'<text x="{x + 18}" y="{y + 11}">all-to-all (lower row; colour of its op)</text>')
        else:
            hatch = (f'<rect x="{x}" y="{y}" width="14" height="14" fill="url(#hatch)"/>' if c else "")
            o.append(f'<rect x="{x}" y="{y}" width="14" height="14" fill="{_fill(k, c)}" stroke="#404040"/>{hatch}'
                     f'<text x="{x + 18}" y="{y + 11}">{LABELS[k]}, {"odd" if c else "even"} chunk</text>')
    o.append("</g></svg>")
    return "\n".join(o)


def to_png(schedule: Schedule, path: str, costs: Any = None, *, dpi: int = 110, progress: bool = False) -> None:
    """The same picture through matplotlib (Agg). progress: a bar on stderr over the boxes, then the render
    (a picture of 10,000 ops takes about half a minute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle
    from tqdm import tqdm

    bx, sim = boxes(schedule, costs)
    kinds, pairs, comm = _legend_entries(bx)
    n = schedule.num_ranks
    row = 1.0 + (0.45 if comm else 0.0)  # lane units per rank
    lanes, legend, margin = 0.4 * n * row, 0.3 * (1 + (len(kinds) + pairs + comm) // 4), 0.55
    height = lanes + legend + 2 * margin
    fig, ax = plt.subplots(figsize=(max(8.0, sim.makespan * 0.22), height))
    fig.subplots_adjust(left=0.07, right=0.99, bottom=(legend + 0.1) / height, top=1 - margin / height)
    for r in range(n):
        ax.add_patch(Rectangle((0, r * row - 0.45), sim.makespan, 0.9, color="#f2f2f2", zorder=0))
    bar = tqdm(total=len(bx), desc="draw PNG", unit="op", disable=not progress)
    for b in bx:
        bar.update()
        y0 = b.rank * row
        labelled = set()
        for p in b.pieces:
            y, h = (y0 + 0.5, 0.4) if p.comm else (y0 - 0.45, 0.9)
            ax.add_patch(Rectangle((p.start, y), p.end - p.start, h, facecolor=_fill(p.kind, p.chunk),
                                   edgecolor="#404040", linewidth=0.5, hatch=ODD_CHUNK_HATCH if p.chunk % 2 else None))
            if not p.comm and (p.kind, p.chunk, p.mb) not in labelled:
                labelled.add((p.kind, p.chunk, p.mb))
                ax.text((p.start + p.end) / 2, y0, str(p.mb), ha="center", va="center", fontsize=7,
                        color=_text_colour(p.kind, p.chunk))
        if len(b.parts) == 2:
            ax.add_patch(Rectangle((b.start, y0 - 0.45), b.end - b.start, 0.9, fill=False, edgecolor="black",
                                   linewidth=1.4))
    ax.set_xlim(0, sim.makespan)
    ax.set_ylim((n - 1) * row + (0.95 if comm else 0.5), -0.5)
    ax.set_yticks([r * row for r in range(n)], [f"rank {r}" for r in range(n)])
    ax.xaxis.tick_top()
    ax.set_title(_title(schedule, sim) + "; time in cost units", fontsize=10, pad=18)
    handles = [Patch(facecolor=_fill(k, c), edgecolor="#404040", hatch=ODD_CHUNK_HATCH if c else None,
                     label=f"{LABELS[k]}, {'odd' if c else 'even'} chunk") for k, c in kinds]
    if pairs:
        handles.append(Patch(facecolor="none", edgecolor="black", label="overlapped F&B pair"))
    if comm:
        handles.append(Patch(facecolor="#cccccc", edgecolor="#404040", label="all-to-all (lower row)"))
    # right under the lanes: anchored to the axes' bottom edge, not the figure's
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.01), ncol=min(4, len(handles)),
              fontsize=7, frameon=False, borderaxespad=0.2)
    bar.set_description("render PNG")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # the legend below the axes stays in the picture
    bar.close()
    plt.close(fig)


def to_html(schedule: Schedule, costs: Any = None) -> str:
    """A standalone page: the SVG and the per-rank numbers."""
    svg = to_svg(schedule, costs)
    sim = schedule.compute_only().simulate(costs)
    rows = "".join(f"<tr><td>{r}</td><td>{sim.busy[r]:g}</td><td>{sim.exposed_comm[r]:g}</td>"
                   f"<td>{sim.bubble[r]:g}</td><td>{sim.peak_activations[r]}</td></tr>"
                   for r in range(schedule.num_ranks))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{schedule.name}</title></head><body>"
            f"{svg}<table border='1' cellpadding='3'><tr><th>rank</th><th>busy</th><th>exposed comm</th>"
            f"<th>bubble</th><th>peak activations</th></tr>{rows}</table></body></html>")


def to_text(schedule: Schedule, costs: Any = None, *, width: int = 4, layout: str = "auto",
            max_width: int = TERMINAL_WIDTH) -> str:
    """Terminal view. layout "columns": one row per time step (the shortest op's duration), one column per
    rank, an op's label where it starts and '|' while it runs ('~' beside it while its all-to-all is in
    flight); "rows": one row per rank, `width` characters per cost unit; "auto": columns when they fit in
    `max_width` characters, else rows. '.' marks idle time."""
    from seekax.ir.validate import check_choice

    check_choice("layout", layout, ("auto", "rows", "columns"))
    bx, sim = boxes(schedule, costs)
    n = schedule.num_ranks
    col = max([len(b.label) for b in bx] + [len(f"rank {n - 1}")]) + 2
    if layout == "columns" or (layout == "auto" and 6 + n * col <= max_width):
        return _text_columns(bx, sim, n, col)
    total = int(round(sim.makespan * width))
    lines = []
    for r in range(n):
        row = ["."] * total
        for b in (b for b in bx if b.rank == r):
            a, e = int(round(b.start * width)), int(round(b.end * width))
            text = (b.label + " " * (e - a))[: max(e - a - 1, 1)] + "|"
            row[a:e] = list(text[: e - a])
        lines.append(f"rank {r:>2} " + "".join(row))
    return "\n".join(lines)


def _text_columns(bx: list[Box], sim: SimResult, n: int, col: int) -> str:
    durations = [b.end - b.start for b in bx if b.end > b.start]
    dt = min(durations) if durations else 1.0
    steps = int(round(sim.makespan / dt)) if durations else 0
    grid = [["."] * n for _ in range(steps)]
    comm = [[False] * n for _ in range(steps)]
    for b in bx:
        a, e = int(round(b.start / dt)), max(int(round(b.end / dt)), int(round(b.start / dt)) + 1)
        for t in range(a, min(e, steps)):
            grid[t][b.rank] = b.label if t == a else "|"
        for p in b.pieces:
            if p.comm:
                for t in range(int(p.start / dt + 1e-9), min(math.ceil(p.end / dt - 1e-9), steps)):
                    comm[t][b.rank] = True
    head = "  time " + "".join(f"{f'rank {r}':<{col}}" for r in range(n))
    lines = [head.rstrip()]
    for t in range(steps):
        cells = "".join(f"{grid[t][r] + (' ~' if comm[t][r] else ''):<{col}}" for r in range(n))
        lines.append(f"{t * dt:>6g} {cells}".rstrip())
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


