"""`seekax schedule show|simulate|plan KIND --ranks N --microbatches M [--costs F,B,W[,FB]]`.

show: draw the per-rank timeline (--out FILE.svg|.png|.html, or a terminal view without --out).
simulate: makespan, bubble and peak activations per rank, next to the DualPipe README formula table.
plan: the lowering's tick table (which op every rank runs in every tick of the shard_map program).
"""

from __future__ import annotations

import pathlib

from seekax.ir.validate import fail
from seekax.schedules.registry import GENERATORS
from seekax.schedules.interleaved import interleaved_1f1b

# Library parameter -> the flag's dest, for errors that name the flag.
PARAMS = {"num_ranks": "ranks", "num_microbatches": "microbatches", "num_chunks": "chunks"}
BIG_PICTURE_OPS = 2000  # PNG pictures with more compute ops than this show a progress bar (~5 s and up)


def register(sub) -> None:
    p = sub.add_parser("schedule", help="draw or simulate a pipeline schedule (DualPipe, 1F1B, ZB1P, ...)",
                       description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, helptext in (("show", "draw the per-rank timeline"), ("simulate", "print makespan, bubbles, memory"),
                           ("plan", "print the lowering's per-tick op table")):
        a = actions.add_parser(name, help=helptext, description=helptext, params=PARAMS)
        a.add_argument("kind", choices=sorted(GENERATORS), help="schedule generator")
        a.add_argument("--ranks", type=int, required=True, help="pipeline ranks (PP)")
        a.add_argument("--microbatches", type=int, required=True,
                       help="micro-batches (DualPipe: both directions together, like the original's num_chunks)")
        a.add_argument("--costs", default=None,
                       help="F,B,W[,FB]: forward, input-grad backward, weight grad, overlapped F&B "
                            "(default 1,1,1,3; full backward = B+W)")
        a.add_argument("--chunks", type=int, default=2, help="chunks per rank (interleaved only)")
        if name in ("show", "simulate"):
            a.add_argument("--comm", default=None, metavar="A2A[,P2P]",
                           help="all-to-all time per chunk and point-to-point time: DeepSeek-V3 sub-steps "
                                "(attention, dispatch, MLP, combine), exposed communication, overlapped vs serial "
                                "F&B (default: no communication)")
        if name == "show":
            a.add_argument("--out", default=None,
                           help="FILE.svg, FILE.png or FILE.html; missing folders are created (default: terminal view)")
        a.set_defaults(func=run)


def _make(args):
    if args.kind == "interleaved":
        return interleaved_1f1b(args.ranks, args.microbatches, args.chunks)
    return GENERATORS[args.kind](args.ranks, args.microbatches)


def formula_table(kind: str, num_ranks: int, num_microbatches: int, costs: dict[str, float],
                  chunks: int = 2) -> list[tuple[str, str, float, str]]:
    """(method, bubble formula, its value, activations per device) rows of the DualPipe README table, plus the
    row for `kind` when it is not among them. B is the full backward there (our BW)."""
    f, b, w, fb = costs["F"], costs["BW"], costs["W"], costs["F&BW"]
    pp = num_ranks
    rows = [("1F1B", "(PP-1)(F+B)", (pp - 1) * (f + b), "PP"),
            ("ZB1P", "(PP-1)(F+B-2W)", (pp - 1) * (f + b - 2 * w), "PP"),
            ("DualPipe", "(PP/2-1)(F&B+B-3W)", (pp / 2 - 1) * (fb + b - 3 * w), "PP+1")]
    if kind == "gpipe":
        rows.append(("GPipe", "(PP-1)(F+B)", (pp - 1) * (f + b), "M"))
    elif kind == "interleaved":
        rows.append((f"interleaved (v={chunks})", "(PP-1)(F+B), F,B per chunk", (pp - 1) * (f + b), "see simulated"))
    elif kind == "dualpipev":
        rows.append(("DualPipeV", "(PP-1)(F&B+B-3W), PP ranks", (pp - 1) * (fb + b - 3 * w), "2PP+1"))
    return rows


def run(args) -> int:
    from seekax.schedules.visualise import default_costs, to_html, to_png, to_svg, to_text

    costs = default_costs(args.costs)
    schedule = _make(args).validate()
    if getattr(args, "comm", None):
        from seekax.schedules.comm_table import comm_report, parse_comm

        costs = parse_comm(args.comm, costs)
        if args.action == "simulate":
            print(comm_report(schedule, costs))
            return 0
    if args.action == "show":
        if args.out is None:
            print(to_text(schedule, costs))
            return 0
        path = pathlib.Path(args.out)
        suffix = path.suffix.lower()
        if suffix not in (".svg", ".png", ".html", ".htm"):
            raise fail("out", args.out, "a .svg, .png or .html file")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".svg":
            path.write_text(to_svg(schedule, costs))
        elif suffix == ".png":
            to_png(schedule, str(path), costs, progress=sum(map(len, schedule.ranks)) > BIG_PICTURE_OPS)
        else:
            path.write_text(to_html(schedule, costs))
        print(f"wrote {path}")
        return 0
    if args.action == "plan":
        from seekax.lowering.pipeline import plan_pipeline

        print(plan_pipeline(schedule).describe())
        return 0
    sim = schedule.simulate(costs)
    print(f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_microbatches} micro-batches, "
          f"{schedule.num_stages} stages, costs {costs}")
    print(f"makespan {sim.makespan:g}")
    print(f"{'rank':>4} {'busy':>8} {'bubble':>8} {'peak act':>9} {'peak W':>7}")
    for r in range(schedule.num_ranks):
        print(f"{r:>4} {sim.busy[r]:>8g} {sim.bubble[r]:>8g} {sim.peak_activations[r]:>9} {sim.peak_pending_w[r]:>7}")
    print("\nDualPipe README table (B = full backward):")
    print(f"{'method':<22} {'bubble formula':<28} {'value':>7} {'activations':>12}")
    for name, text, value, act in formula_table(schedule.name if args.kind != "interleaved" else "interleaved",
                                                schedule.num_ranks, schedule.num_microbatches, costs, args.chunks):
        print(f"{name:<22} {text:<28} {value:>7g} {act:>12}")
    print(f"{'this schedule':<22} {'simulated, max over ranks':<28} {max(sim.bubble):>7g} "
          f"{max(sim.peak_activations):>12}")
    return 0
