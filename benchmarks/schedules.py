"""Pipeline schedules: (1) generator + validate + simulate time at 64 ranks x 256 micro-batches (target: well
under 1 s for DualPipe); (2) step time of every schedule lowered by `pipeline_train_step` on 8 devices (8 CPU
host devices unless a GPU machine provides 8), best of N calls as a ratio to GPipe's best in the same run
(the minimum resists other jobs on a shared machine; the median is printed too), next to the
unit-cost makespan ratios: free-running replay (`simulate`) and the lowered program's lock-step ticks
(`PipelinePlan.lockstep_makespan`: every tick lasts as long as its longest op); (3) the lowering's overhead:
each pipelined step against the unpipelined jax.value_and_grad step on the same 8 devices, in time and in work
(XLA flop counts), target time ratio <= 1.5 x work ratio (`overhead_rows`). Every schedule runs the same model:
16 layers (2 per stage where a schedule has 8 stages, 1 where it has 16) of tanh(x W + b) + x.

  .venv/bin/python benchmarks/schedules.py [--quick] [--only generator|step|overhead] [--json OUT.json]
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


def stage_fn(p, x):
    """The benchmark model's stage: residual tanh layers, p["w"] [layers per stage, width, width]."""
    for i in range(p["w"].shape[0]):
        x = jnp.tanh(x @ p["w"][i] + p["b"][i]) + x
    return x


def loss_fn(y, t):
    return jnp.mean((y - t) ** 2)


def step_rows(microbatches: int, width: int, tokens: int, iters: int) -> list[dict]:
    devices = jax.devices()[:8]
    if len(devices) < 8:
        return [{"part": "step", "kind": "skipped", "note": f"{len(devices)} devices < 8"}]
    mesh = jax.make_mesh((8,), ("pp",), devices=devices)
    layers = 16
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(microbatches, tokens, width)), jnp.float32)
    ts = jnp.asarray(rng.normal(size=(microbatches, tokens, width)), jnp.float32)

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


def _flops(fn, *args) -> float:
    """XLA's flop count of one jitted call (cost analysis of the compiled program, one device)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _best(fn, args, iters: int) -> tuple[float, float]:
    return _interleaved([(fn, args)], iters)[0]


def _interleaved(calls, iters: int) -> list[tuple[float, float]]:
    """(best, median) seconds of each (fn, args), timed in turns so a load change on a shared machine hits
    all of them alike."""
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    samples = [[] for _ in calls]
    for _ in range(iters):
        for i, (fn, args) in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[i].append(time.perf_counter() - t0)
    return [(min(x), statistics.median(x)) for x in samples]


def _ops_only(s, stage_fn, mesh):
    """A program in which every device runs the compute ops its rank runs in `s` (F, B, W, BW; F&BW = F + BW),
    each on its own micro-batch input, in a plain scan: no conditionals, buffers or messages."""
    from jax.sharding import PartitionSpec as P

    kinds = ("F", "B", "W", "BW")
    counts = dict.fromkeys(kinds, 0)
    for op in s.ranks[0]:
        for k, _, _ in op.parts():
            counts[k] += 1

    def body(params, xs, ts):
        p0 = jax.tree.map(lambda a: a[0], params)  # this rank's first stage: every stage has the same shapes
        xs = jax.lax.pcast(xs, ("pp",), to="varying")
        ts = jax.lax.pcast(ts, ("pp",), to="varying")
        m = xs.shape[0]
        total = jax.lax.pcast(jnp.zeros(()), ("pp",), to="varying")
        acc = jax.tree.map(jnp.zeros_like, p0)
        ops = {"F": lambda x, g: (None, stage_fn(p0, x)),
               "B": lambda x, g: (None, jax.vjp(lambda xx: stage_fn(p0, xx), x)[1](g)[0]),
               "W": lambda x, g: (jax.vjp(lambda pp: stage_fn(pp, x), p0)[1](g)[0], None),
               "BW": lambda x, g: jax.vjp(stage_fn, p0, x)[1](g)}
        for k in kinds:
            if not counts[k]:
                continue

            def one(carry, i, k=k):
                tot, acc = carry
                gp, out = ops[k](xs[i % m], ts[i % m])
                if gp is not None:
                    acc = jax.tree.map(jnp.add, acc, gp)
                return (tot + (0.0 if out is None else out.sum()), acc), None

            (total, acc), _ = jax.lax.scan(one, (total, acc), jnp.arange(counts[k]))
        return total[None], jax.tree.map(lambda a: a[None], acc)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("pp"), P(), P()), out_specs=(P("pp"), P("pp"))))


def overhead_rows(microbatches: int, width: int, tokens: int, iters: int, kinds=None) -> list[dict]:
    """The lowering's overhead: the pipelined step against the unpipelined jax.value_and_grad step of the same
    model on the same 8 devices (data parallel over all 8, tokens split), as time and as work (XLA flop counts:
    the pipelined step's per-op VJPs recompute each stage's forward, which counts as work). Target:
    time ratio <= 1.5 x work ratio. The same schedule on a width-8 model times the per-tick fixed cost."""
    devices = jax.devices()[:8]
    if len(devices) < 8:
        return [{"part": "overhead", "kind": "skipped", "note": f"{len(devices)} devices < 8"}]
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    layers = 16
    rng = np.random.default_rng(1)

    def problem(s, w, tok):
        per = layers // s.num_stages
        params = {"w": jnp.asarray(rng.normal(size=(s.num_stages, per, w, w)) / np.sqrt(w) * 0.5, jnp.float32),
                  "b": jnp.zeros((s.num_stages, per, w), jnp.float32)}
        xs = jnp.asarray(rng.normal(size=(microbatches, tok, w)), jnp.float32)
        ts = jnp.asarray(rng.normal(size=(microbatches, tok, w)), jnp.float32)
        return params, xs, ts

    pp_mesh = jax.make_mesh((8,), ("pp",), devices=devices)
    auto_mesh = jax.make_mesh((8,), ("pp",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    dp_mesh = jax.make_mesh((8,), ("dp",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    rows = []
    for kind in kinds or ("gpipe", "1f1b", "zb1p", "interleaved", "dualpipe", "dualpipev"):
        s = make_schedule(kind, 8, microbatches)
        plan = plan_pipeline(s)
        params, xs, ts = problem(s, width, tokens)
        # the plain step: value_and_grad of the whole model over all micro-batches as one batch (equal-sized
        # micro-batches: the same mean loss), tokens split over the 8 devices
        def plain_loss(p, x, t):  # x, t: [M * tokens, width]
            for st in range(s.num_stages):
                x = stage_fn(jax.tree.map(lambda a: a[st], p), x)
            return loss_fn(x, t)

        plain = jax.jit(jax.value_and_grad(plain_loss))
        flat_x, flat_t = xs.reshape(-1, width), ts.reshape(-1, width)
        rep, rows_dp = NamedSharding(dp_mesh, P()), NamedSharding(dp_mesh, P("dp"))
        plain_args = (jax.device_put(params, rep), jax.device_put(flat_x, rows_dp), jax.device_put(flat_t, rows_dp))
        step = make_pipeline_train_step(plan, stage_fn, loss_fn, mesh=pp_mesh)
        (t_plain, _), (t_plain1, _), (t_pipe, t_pipe_med) = _interleaved(
            [(plain, plain_args), (plain, (params, flat_x, flat_t)), (step, (params, xs, ts))], iters)
        # work in flops: the plain step as compiled on one device; the pipelined step op by op
        w_plain = _flops(jax.value_and_grad(plain_loss), params, flat_x, flat_t)
        p0 = jax.tree.map(lambda a: a[0], params)
        x0, t0 = xs[0], ts[0]
        f = _flops(stage_fn, p0, x0)
        vjp_x = _flops(lambda p, x, g: jax.vjp(lambda xx: stage_fn(p, xx), x)[1](g), p0, x0, x0)
        vjp_p = _flops(lambda p, x, g: jax.vjp(lambda pp: stage_fn(pp, x), p)[1](g), p0, x0, x0)
        vjp_xp = _flops(lambda p, x, g: jax.vjp(stage_fn, p, x)[1](g), p0, x0, x0)
        loss_vg = _flops(jax.value_and_grad(loss_fn), x0, t0)
        per_kind = {"F": f, "B": vjp_x, "W": vjp_p, "BW": vjp_xp, "F&BW": f + vjp_xp}
        w_pipe = sum(per_kind[op.kind] for ops in s.ranks for op in ops) + microbatches * loss_vg
        # the same ops without the pipeline machinery: every device runs its rank's op counts straight
        ops_only = _ops_only(s, stage_fn, auto_mesh)
        (t_ops, _), (t_pipe2, _) = _interleaved([(ops_only, (params, xs, ts)), (step, (params, xs, ts))], iters)
        # the fixed per-tick cost: the same schedule and program shape on a width-8, 8-token model
        tp, txs, tts = problem(s, 8, 8)
        tiny = make_pipeline_train_step(plan, stage_fn, loss_fn, mesh=pp_mesh)
        t_tiny, _ = _best(tiny, (tp, txs, tts), iters)
        time_ratio, work_ratio = t_pipe / t_plain, w_pipe / w_plain
        rows.append({"part": "overhead", "kind": kind, "ticks": plan.num_ticks, "plain_s": t_plain,
                     "plain_1dev_s": t_plain1,
                     "pipelined_s": t_pipe, "pipelined_median_s": t_pipe_med, "time_ratio": time_ratio,
                     "work_ratio": work_ratio, "time_over_work": time_ratio / work_ratio,
                     "target_met": time_ratio <= 1.5 * work_ratio, "ops_only_s": t_ops,
                     "machinery_share": 1 - t_ops / t_pipe2, "tiny_model_s": t_tiny,
                     "per_tick_ms": 1e3 * t_tiny / plan.num_ticks,
                     "fixed_share": t_tiny / t_pipe, "excess_s": t_pipe - t_plain * work_ratio})
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only", choices=("generator", "step", "overhead"), default=None, help="run one part")
    args = p.parse_args()
    parts = (args.only,) if args.only else ("generator", "step", "overhead")
    rows = []
    if args.quick:
        if "generator" in parts:
            rows += generator_rows(16, 64, repeats=2)
            rows += generator_rows(64, 256, repeats=1)
        if "step" in parts:
            rows += step_rows(microbatches=16, width=32, tokens=8, iters=3)
        if "overhead" in parts:
            rows += overhead_rows(microbatches=16, width=64, tokens=32, iters=3, kinds=("1f1b", "dualpipe"))
    else:
        if "generator" in parts:
            rows += generator_rows(64, 256, repeats=5)
        if "step" in parts:
            rows += step_rows(microbatches=32, width=256, tokens=128, iters=5)
        if "overhead" in parts:
            rows += overhead_rows(microbatches=32, width=256, tokens=128, iters=7)
    for part in parts:
        emit("schedules", [r for r in rows if r["part"] == part], None)
        print()
    if args.json:
        with contextlib.redirect_stdout(io.StringIO()):
            emit("schedules", rows, args.json)


if __name__ == "__main__":
    main()
