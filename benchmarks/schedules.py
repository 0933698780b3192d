"""Pipeline schedules: (1) generator + validate + simulate time at 64 ranks x 256 micro-batches (target: well
under 1 s for DualPipe); (2) step time of every schedule lowered by `pipeline_train_step` on 8 devices (8 CPU
host devices unless a GPU machine provides 8), best of N calls as a ratio to GPipe's best in the same run
(the minimum resists other jobs on a shared machine; the median is printed too), next to the
unit-cost makespan ratios: free-running replay (`simulate`) and the lowered program's lock-step ticks
(`PipelinePlan.lockstep_makespan`: every tick lasts as long as its longest op). Every schedule runs the
same model: 16 layers (2 per stage where a schedule has 8 stages, 1 where it has 16) of tanh(x W + b) + x.

  .venv/bin/python benchmarks/schedules.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import contextlib  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, parser  # noqa: E402

from seekax.lowering.pipeline import plan_pipeline  # noqa: E402
from seekax.layers.pipeline import make_pipeline_train_step  # noqa: E402
from seekax.schedules.passes import split_all_backward  # noqa: E402
from seekax.schedules.registry import make_schedule  # noqa: E402


def generator_rows(ranks: int, microbatches: int, repeats: int) -> list[dict]:
    rows = []
    for kind in ("dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe", "interleaved"):
        n = ranks if kind != "dualpipev" else ranks // 2
        gen, val, sim = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s = make_schedule(kind, n, microbatches)
            t1 = time.perf_counter()
            s.validate()
            t2 = time.perf_counter()
            res = s.simulate()
            t3 = time.perf_counter()
            gen.append(t1 - t0), val.append(t2 - t1), sim.append(t3 - t2)
        total = statistics.median(g + v + x for g, v, x in zip(gen, val, sim))
        rows.append({"part": "generator", "kind": kind, "ranks": n, "microbatches": microbatches,
                     "ops": sum(len(o) for o in s.ranks), "generate_s": statistics.median(gen),
                     "validate_s": statistics.median(val), "simulate_s": statistics.median(sim),
                     "total_s": total, "makespan_unit": res.makespan, "bubble_unit": max(res.bubble)})
    return rows


def step_rows(microbatches: int, width: int, tokens: int, iters: int) -> list[dict]:
    devices = jax.devices()[:8]
    if len(devices) < 8:
        return [{"part": "step", "kind": "skipped", "note": f"{len(devices)} devices < 8"}]
    mesh = jax.make_mesh((8,), ("pp",), devices=devices)
    layers = 16
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(microbatches, tokens, width)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(microbatches, tokens, width)), jnp.float32)

    def stage_fn(p, x):  # p["w"]: [layers per stage, width, width]
        for i in range(p["w"].shape[0]):
            x = jnp.tanh(x @ p["w"][i] + p["b"][i]) + x
        return x

    def loss_fn(y, t):
        return jnp.mean((y - t) ** 2)

    rows, base = [], None
    variants = [(k, False) for k in ("gpipe", "1f1b", "zb1p", "interleaved", "dualpipe", "dualpipev")]
    variants += [("1f1b", True), ("dualpipe", True)]
    for kind, split in variants:
        n = 8
        s = make_schedule(kind, n, microbatches)
        if split:  # unit ops only, so lock-step ticks never mix costs (see split_all_backward)
            s = split_all_backward(s)
        per = layers // s.num_stages
        params = {"w": jnp.asarray(rng.normal(size=(s.num_stages, per, width, width)) / np.sqrt(width) * 0.5,
                                   jnp.float32),
                  "b": jnp.zeros((s.num_stages, per, width), jnp.float32)}
        plan = plan_pipeline(s)
        step = make_pipeline_train_step(plan, stage_fn, loss_fn, mesh=mesh)
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, xs, ts))
        compile_s = time.perf_counter() - t0
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, xs, ts))
            samples.append(time.perf_counter() - t0)
        sec, best = statistics.median(samples), min(samples)
        # unit-cost makespan with stage-sized ops: layer-count-weighted so 16-stage schedules are comparable
        costs = {k: v * per for k, v in {"F": 1, "B": 1, "W": 1, "BW": 2, "F&BW": 3}.items()}
        unit = s.simulate(costs).makespan
        lockstep = plan.lockstep_makespan(costs)
        if kind == "gpipe":
            base = (best, unit, lockstep)
        rows.append({"part": "step", "kind": kind + ("+split" if split else ""), "stages": s.num_stages,
                     "ticks": plan.num_ticks,
                     "act_slots": plan.num_act_slots, "compile_s": compile_s, "step_median_s": sec,
                     "step_min_s": best, "min_vs_gpipe": best / base[0], "sim_makespan_vs_gpipe": unit / base[1],
                     "lockstep_vs_gpipe": lockstep / base[2]})
    return rows


def main() -> None:
    args = parser(__doc__).parse_args()
    if args.quick:
        rows = generator_rows(16, 64, repeats=2)
        rows += generator_rows(64, 256, repeats=1)
        rows += step_rows(microbatches=16, width=32, tokens=8, iters=3)
    else:
        rows = generator_rows(64, 256, repeats=5)
        rows += step_rows(microbatches=32, width=256, tokens=128, iters=5)
    gen = [r for r in rows if r["part"] == "generator"]
    step = [r for r in rows if r["part"] == "step"]
    emit("schedules", gen, None)
    print()
    emit("schedules", step, None)
    if args.json:
        with contextlib.redirect_stdout(io.StringIO()):
            emit("schedules", rows, args.json)


if __name__ == "__main__":
    main()
