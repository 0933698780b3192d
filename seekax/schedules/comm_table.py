"""Step time, exposed communication and bubble of the classic schedules and DualPipe under communication-aware
costs (`CommCosts`), next to the DualPipe README's bubble formulas evaluated with the same op durations.

`comm_table(16, 40, CommCosts.deepseek_v3())` is DeepSeek-V3's setting: PP 16, all-to-all about equal to
computation per chunk; DualPipe hides most of it by overlapping one micro-batch's all-to-all with another's
computation inside its F&B ops, and its bubble shrinks with the F&B op.
"""

from __future__ import annotations

import dataclasses

from seekax.ir.schedule import Schedule
from seekax.ir.schedule_costs import CommCosts
from seekax.schedules.registry import make_schedule


@dataclasses.dataclass(frozen=True)
class CommRow:
    """One schedule under one cost model; per-rank figures are the maximum over ranks."""

    name: str
    makespan: float
    busy: float
    exposed_comm: float
    bubble: float
    formula: str
    formula_value: float | None


def formula(kind: str, num_ranks: int, costs: CommCosts) -> tuple[str, float | None]:
    """The DualPipe README's bubble formula for `kind` with op durations from `costs` (B = full backward)."""
    t = {k: d for k, (d, _) in costs.timings().items()}
    f, b, w, fb, pp = t["F"], t["BW"], t["W"], t["F&BW"], num_ranks
    return {"1f1b": ("(PP-1)(F+B)", (pp - 1) * (f + b)),
            "gpipe": ("(PP-1)(F+B)", (pp - 1) * (f + b)),
            "zb1p": ("(PP-1)(F+B-2W)", (pp - 1) * (f + b - 2 * w)),
            "dualpipe": ("(PP/2-1)(F&B+B-3W)", (pp / 2 - 1) * (fb + b - 3 * w)),
            "dualpipev": ("(PP-1)(F&B+B-3W), PP ranks", (pp - 1) * (fb + b - 3 * w))}.get(kind, ("", None))


def row(name: str, schedule: Schedule, costs: CommCosts, kind: str) -> CommRow:
    sim = schedule.simulate(costs)
    text, value = formula(kind, schedule.num_ranks, costs)
    return CommRow(name=name, makespan=sim.makespan, busy=max(sim.busy), exposed_comm=max(sim.exposed_comm),
                   bubble=max(sim.bubble), formula=text, formula_value=value)


def comm_table(num_ranks: int, num_microbatches: int, costs: CommCosts,
               extra: Schedule | None = None) -> tuple[list[CommRow], list[str]]:
    """Rows for 1F1B, ZB1P, DualPipe with serial F&B and DualPipe with overlapped F&B (plus `extra`, a
    schedule of another kind); and notes for schedules these sizes do not admit."""
    rows, notes = [], []
    for kind, label in (("1f1b", "1F1B"), ("zb1p", "ZB1P")):
        rows.append(row(label, make_schedule(kind, num_ranks, num_microbatches), costs, kind))
    try:
        dp = make_schedule("dualpipe", num_ranks, num_microbatches)
    except ValueError as e:
        notes.append(f"DualPipe: {e}")
    else:
        rows.append(row("DualPipe, serial F&B", dp, costs.with_overlap(False), "dualpipe"))
        rows.append(row("DualPipe, overlapped F&B", dp, costs.with_overlap(True), "dualpipe"))
    if extra is not None and extra.name not in ("1f1b", "zb1p", "dualpipe"):
        base = "dualpipev" if extra.name == "dualpipev" else extra.name
        rows.append(row(f"{extra.name}, serial F&B", extra, costs.with_overlap(False), base))
        rows.append(row(f"{extra.name}, overlapped F&B", extra, costs.with_overlap(True), base))
    return rows, notes


def format_table(rows: list[CommRow]) -> str:
    """Plain-text table (also valid Markdown)."""
    head = "| schedule | step time | vs 1F1B | busy | exposed comm | bubble | README formula | formula value |"
    out = [head, "|---|---|---|---|---|---|---|---|"]
    base = rows[0].makespan if rows else 1.0
    for r in rows:
        fv = "" if r.formula_value is None else f"{r.formula_value:g}"
        out.append(f"| {r.name} | {r.makespan:g} | {r.makespan / base:.2f} | {r.busy:g} | {r.exposed_comm:g} | "
                   f"{r.bubble:g} | {r.formula} | {fv} |")
    return "\n".join(out)


def parse_comm(text: str, costs: dict[str, float]) -> CommCosts:
    """`--comm A2A[,P2P]`: all-to-all time per chunk (dispatch + combine, forward and backward alike) and
    point-to-point time, on top of the per-kind compute costs F, B, W (DeepSeek-V3's attention/MLP halves)."""
    from seekax.ir.validate import fail

    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise fail("comm", text, "numbers A2A[,P2P]") from None
    if len(vals) not in (1, 2) or any(v < 0 for v in vals):
        raise fail("comm", text, "one or two non-negative numbers A2A[,P2P]")
    return CommCosts.deepseek_v3(f=costs["F"], b=costs["B"], w=costs["W"], a2a=vals[0],
                                 p2p=vals[1] if len(vals) == 2 else 0.0)


def comm_report(schedule: Schedule, costs: CommCosts) -> str:
    """Per-rank busy / exposed communication / bubble of `schedule` with serial and overlapped F&B, then the
    comparison table at the same sizes."""
    lines = [f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_microbatches} micro-batches; "
             f"per chunk: " + ", ".join(f"{s.name} {'comm' if s.comm else 'compute'} f={s.f:g} b={s.b:g} w={s.w:g}"
                                         for s in costs.substeps) + f"; p2p {costs.p2p:g}"]
    sims = {ov: schedule.simulate(costs.with_overlap(ov)) for ov in (False, True)}
    lines.append(f"step time: serial F&B {sims[False].makespan:g}, overlapped F&B {sims[True].makespan:g}")
    lines.append(f"{'rank':>4} {'busy':>8} | {'exposed':>8} {'bubble':>8} (serial) | {'exposed':>8} {'bubble':>8} "
                 f"(overlapped)")
    for r in range(schedule.num_ranks):
        a, b = sims[False], sims[True]
        lines.append(f"{r:>4} {a.busy[r]:>8g} | {a.exposed_comm[r]:>8g} {a.bubble[r]:>8g}          | "
                     f"{b.exposed_comm[r]:>8g} {b.bubble[r]:>8g}")
    rows, notes = comm_table(schedule.num_ranks, schedule.num_microbatches, costs, extra=schedule)
    lines += ["", format_table(rows)] + [f"({n})" for n in notes]
    return "\n".join(lines)
