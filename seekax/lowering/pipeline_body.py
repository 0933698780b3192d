"""The per-device body of a lowered pipeline schedule (stage 2 of the lowering; `pipeline.plan_pipeline` is
stage 1): a `lax.scan` over ticks in which every rank runs its op through `lax.switch`, then activations and
gradients move by cyclic `ppermute` one rank right or left (both for DualPipe; the wrap for interleaved 1F1B),
or stay on the rank (the turn of DualPipeV's V).

Branches are *variants*: (op code, forward stage class, backward stage class) as they occur in the tables, so
each branch knows statically which stage function and which layouts it runs; the parameters of a class's stage
are picked by chunk at run time. All values travel in flat buffers (`pipeline_layout`): parameter rows
[num_chunks, size] per (dtype, mesh axes), activation and gradient slots [slots + 1, size] per dtype, so stages
with different parameter trees and activation pytrees share one SPMD program.

B, W and BW recompute the stage forward from the stashed stage input (activation checkpointing per stage); a
stage with sub-steps also stashes its intermediate carries, so its backward is the chain of its sub-steps' VJPs
and recomputes no communication. An F&BW whose stages have sub-steps runs the forward's and the backward's steps
interleaved (`pipeline_stages.interleave`) under the named scopes FB_FORWARD / FB_BACKWARD; the two streams
share no value inside the tick, which `pipeline_hlo.fb_cross_stream_paths` checks on the lowered program.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seekax.ir.validate import check_choice
from seekax.lowering.pipeline import B, BW, CODE_NAMES, F, F_LAST, FBW, FBW_LAST, NOOP, W, PipelinePlan
from seekax.lowering.pipeline_stages import StageProgram, interleave

FB_FORWARD = "seekax_fb_forward"
FB_BACKWARD = "seekax_fb_backward"
FB_ORDERS = ("overlap", "serial")


def variant_table(plan: PipelinePlan, program: StageProgram) -> tuple[tuple[tuple[int, int, int], ...], np.ndarray]:
    """The distinct (code, forward class, backward class) of the plan's ops (-1: no such part) and the
    [num_ranks, num_ticks] int32 table of their indices (the lax.switch branch index)."""
    s, t = plan.schedule, plan.tables
    found: dict[tuple[int, int, int], int] = {(NOOP, -1, -1): 0}
    table = np.zeros(t["code"].shape, np.int32)
    for r in range(s.num_ranks):
        for tick in range(plan.num_ticks):
            code = int(t["code"][r, tick])
            if code == NOOP:
                continue
            kf = kb = -1
            if code in (F, F_LAST, FBW, FBW_LAST):
                kf = program.stage_class[s.chunk_stages[r][int(t["f_chunk"][r, tick])]]
            if code in (B, W, BW, FBW, FBW_LAST):
                kb = program.stage_class[s.chunk_stages[r][int(t["b_chunk"][r, tick])]]
            table[r, tick] = found.setdefault((code, kf, kb), len(found))
    return tuple(found), table


def lower_pipeline(plan: PipelinePlan, program: StageProgram, variants: tuple[tuple[int, int, int], ...],
                   loss_fn: Callable, *, pp_axis: str = "pp", batch_axes: tuple[str, ...] = (),
                   batch_shards: int = 1, has_targets: bool = True, has_loss_params: bool = False,
                   input_grads: bool = False, has_aux: bool = False, fb_order: str = "overlap") -> Callable:
    """The per-device body for `shard_map`:
    (params, loss_params, microbatches, targets, tables) -> (loss, grads, loss_grads, input_grads, aux).

    params: {ParamKey: [1, num_chunks, 1.., size]} this rank's parameter rows (one 1 per mesh axis of the key);
    loss_params: pytree (replicated) or (); microbatches: pytree of [M, ...]; targets: pytree of [M, ...] or
    None; tables: dict of [1, num_ticks] int32 with "variant" (see `variant_table`).
    Returns the loss summed over `pp` (mean over micro-batches and `batch_axes` shards), the gradient rows
    shaped like params, the loss_params grads (summed over `pp`), with input_grads d loss / d microbatches
    (else ()), and with has_aux the aux sums {dtype: [1, num_chunks, size]} (else ()).
    fb_order: "overlap" (F&B sub-steps interleaved, no data shared) or "serial" (the backward waits for the
    forward's output: a deliberately serialised program, for the overlap test to tell apart)."""
    check_choice("fb_order", fb_order, FB_ORDERS)
    s = plan.schedule
    n, S, M = s.num_ranks, s.num_stages, s.num_microbatches
    scale = 1.0 / (M * batch_shards)
    vary_axes = (pp_axis,) + tuple(batch_axes)
    prog = program

    def body(packed, loss_params, microbatches, targets, tables):
        nc = s.num_chunks
        params = {k: v.reshape(nc, v.shape[-1]) for k, v in packed.items()}  # [num_chunks, size]
        rows = {k: v[0] for k, v in tables.items()}  # [num_ticks]

        def varying_over(x, axes):
            missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
            return lax.pcast(x, missing, to="varying") if missing else x

        def varying(tree):
            return jax.tree.map(lambda x: varying_over(x, vary_axes), tree)

        def param_rows(c):
            return {k: v[c] for k, v in params.items()}

        def stage_params(k, prow):
            return prog.params.unpack(k, prow)

        def loss_of(y, lp, gmb):
            args = (y, jax.tree.map(lambda t: t[gmb], targets)) if has_targets else (y,)
            return loss_fn(lp, *args) if has_loss_params else loss_fn(*args)

        def read(buf, slot):
            return {key: v[slot] for key, v in buf.items()}

        # --- forward -------------------------------------------------------------------------------------
        def forward_input(k, bufs, row):
            """The packed stage input: the micro-batch at stage 0, else the received activation."""
            stages = prog.class_stages[k]
            if 0 not in stages:
                return read(bufs["act"], row["f_slot"])
            mb = varying(prog.acts.pack(0, jax.tree.map(lambda a: a[row["f_gmb"]], microbatches)))
            if len(stages) == 1:
                return mb
            act = read(bufs["act"], row["f_slot"])
            return {key: jnp.where(row["f_first"] == 1, mb[key], act[key]) for key in act}

        def forward_steps(k, prow, x):
            """Generator-free step list: [(comm, fn(h) -> h)] of class k's forward."""
            p = stage_params(k, prow)
            stage = prog.class_stage[k]
            if has_aux:
                return [(False, lambda h: stage.fn(p, h))]
            return [(sub.comm, (lambda h, f=sub.fn: f(p, h))) for sub in stage.steps()]

        def forward_finish(k, last, y, row, out):
            """Loss and its gradient at the last stage, else the activation message."""
            if has_aux:
                y, aux = y
                packed_aux = prog.aux.pack(k, lax.stop_gradient(aux))
                c = row["f_chunk"]
                out["aacc"] = {key: a.at[c].add(packed_aux[key].astype(a.dtype)) for key, a in out["aacc"].items()}
            if last:
                l, (gy, gh) = jax.value_and_grad(loss_of, argnums=(0, 1), allow_int=True)(y, lp_local, row["f_gmb"])
                gy = jax.tree.map(lambda g, v: (g * scale).astype(v.dtype) if _is_float(v) else g, gy, y)
                out["gy"] = varying(prog.cots.pack(S, gy))
                out["loss"] = varying_over(l.astype(jnp.float32) * scale, vary_axes)
                out["hacc"] = jax.tree.map(lambda a, d: a + (d * scale).astype(a.dtype), out["hacc"], gh)
            else:
                out["act_msg"] = varying(prog.acts.pack(prog.class_stages[k][0] + 1, y))

        # --- backward ------------------------------------------------------------------------------------
        def backward_steps(k, prow, bufs, row, need_x, need_p):
            """[(comm, fn(g) -> g)] of class k's backward (reverse sub-step order) and a finisher that returns
            (param-row grads, packed input grad)."""
            st0 = prog.class_stages[k][0]
            stage = prog.class_stage[k]
            x = prog.acts.unpack(st0, read(bufs["act"], row["b_slot"]))
            subs = stage.substeps
            if subs:
                carries = prog.subs.unpack(k, read(bufs["sub"], row["b_slot"]))
                inputs = (x,) + tuple(carries)
                fns = [sub.fn for sub in subs]
                comms = [sub.comm for sub in subs]
            else:
                inputs, fns, comms = (x,), [_activation_only(stage.fn, has_aux)], [False]
            grads: list[Any] = []
            # Differentiate w.r.t. the stage's parameter tree (slices of the row), not the row itself: the
            # row's cotangent would be one zero-padded full row per leaf, summed.
            p = stage_params(k, prow)

            def step(i):
                f, h = fns[i], inputs[i]

                def run(g):
                    want_h = need_x or i > 0  # carries' grads continue the chain; the stage input's is asked for
                    if want_h and need_p:
                        _, vjp = jax.vjp(f, p, h)
                        gp, gh = vjp(g)
                    elif need_p:
                        _, vjp = jax.vjp(lambda pp: f(pp, h), p)
                        (gp,), gh = vjp(g), None
                    elif want_h:
                        _, vjp = jax.vjp(lambda hh: f(p, hh), h)
                        (gh,), gp = vjp(g), None
                    else:
                        return None
                    if gp is not None:
                        grads.append(gp)
                    return gh
                return run

            order = [(comms[i], step(i)) for i in reversed(range(len(fns)))]

            def finish(gx):
                gp = None
                if grads:
                    gp = grads[0]
                    for more in grads[1:]:
                        gp = jax.tree.map(jnp.add, gp, more)
                gx_packed = varying(prog.cots.pack(st0, gx)) if need_x else None
                return gp, gx_packed

            g = prog.cots.unpack(st0 + 1, read(bufs["grad"], row["b_gslot"]))
            return order, finish, g

        def wants_x(k):
            """Input grads are needed unless the class is stage 0 alone and nobody asked for them."""
            return input_grads or prog.class_stages[k] != (0,)

        # --- one branch per variant -------------------------------------------------------------------------
        def make_branch(code, kf, kb):
            has_f, has_b = kf >= 0, kb >= 0
            last = code in (F_LAST, FBW_LAST)
            need_x = has_b and code in (B, BW, FBW, FBW_LAST) and wants_x(kb)
            need_p = code in (W, BW, FBW, FBW_LAST)

            def branch(bufs, row):
                out = empty_outputs(bufs)
                f_steps = b_steps = []
                if has_f:
                    x_packed = forward_input(kf, bufs, row)
                    out["stash"] = x_packed
                    x = prog.acts.unpack(prog.class_stages[kf][0], x_packed)
                    f_steps = forward_steps(kf, param_rows(row["f_chunk"]), x)
                    f_state = [x]
                if has_b:
                    prow_b = param_rows(row["b_chunk"])
                    b_steps, finish, g0 = backward_steps(kb, prow_b, bufs, row, need_x, need_p)
                    b_state = [g0]

                # The two streams of an F&B are named in the program (metadata op_name), for the HLO check.
                paired = has_f and has_b
                f_scope = (lambda: jax.named_scope(FB_FORWARD)) if paired else contextlib.nullcontext
                b_scope = (lambda: jax.named_scope(FB_BACKWARD)) if paired else contextlib.nullcontext

                def run_f(i):
                    with f_scope():
                        f_state.append(f_steps[i][1](f_state[-1]))

                def run_b(j):
                    with b_scope():
                        b_state.append(b_steps[j][1](b_state[-1]))

                if has_f and has_b and fb_order == "serial":
                    for i in range(len(f_steps)):
                        run_f(i)
                    with b_scope():  # the backward starts once the forward is done
                        f_state[-1], b_state[-1] = lax.optimization_barrier((f_state[-1], b_state[-1]))
                    for j in range(len(b_steps)):
                        run_b(j)
                else:
                    for stream, i in interleave([c for c, _ in f_steps], [c for c, _ in b_steps]):
                        (run_f if stream == "F" else run_b)(i)
                if has_f:
                    k = kf
                    if prog.subs is not None:
                        carries = tuple(f_state[1:-1]) if prog.has_substeps(k) else ()
                        out["sub_stash"] = varying(prog.subs.pack(k, carries))
                    with f_scope():
                        forward_finish(k, last, f_state[-1], row, out)
                if has_b:
                    with b_scope():
                        gp, gx = finish(b_state[-1])
                        if gp is not None:  # each leaf's gradient into its slice of the chunk's row
                            out["gacc"] = prog.params.members[kb].add_into(out["gacc"], row["b_chunk"], gp)
                        if gx is not None:
                            out["grad_msg"] = gx
                return tuple(out[name] for name in OUTPUTS)

            return branch

        def empty_outputs(bufs):
            zero_act = varying(prog.acts.zeros(()))
            zero_cot = varying(prog.cots.zeros(()))
            return {"stash": zero_act, "sub_stash": varying(prog.subs.zeros(())) if prog.subs else {},
                    "act_msg": zero_act, "grad_msg": zero_cot, "gy": zero_cot,
                    "loss": varying_over(jnp.zeros((), jnp.float32), vary_axes),
                    "gacc": bufs["gacc"], "hacc": bufs["hacc"], "aacc": bufs["aacc"]}

        branches = [make_branch(*v) for v in variants]

        def tick(state, row):
            bufs = dict(state)
            out = dict(zip(OUTPUTS, lax.switch(row["variant"], branches, bufs, row)))
            act = {k: v.at[row["f_slot"]].set(out["stash"][k]) for k, v in state["act"].items()}
            sub = {k: v.at[row["f_slot"]].set(out["sub_stash"][k]) for k, v in state["sub"].items()}
            grad = {k: v.at[row["f_gslot"]].set(out["gy"][k]) for k, v in state["grad"].items()}
            ig = state["ig"]
            if input_grads:  # stage 0's input-grad is d loss / d micro-batch (row M is the trash row)
                at = jnp.where(row["b_first"] == 1, row["b_gmb"], M)
                ig = {k: v.at[at].set(out["grad_msg"][k]) for k, v in ig.items()}
            bufs_out = {"act": act, "grad": grad}
            for kind, chans in (("act", plan.act_channels), ("grad", plan.grad_channels)):
                msg = out[f"{kind}_msg"]
                for d in chans:
                    recv = msg if d == 0 else _send(msg, row[f"send_{kind}_{d}"], pp_axis, _shift(n, d))
                    slot = row[f"recv_{kind}_{d}"]
                    bufs_out[kind] = {k: v.at[slot].set(recv[k]) for k, v in bufs_out[kind].items()}
            act, grad = bufs_out["act"], bufs_out["grad"]
            return {"act": act, "sub": sub, "grad": grad, "gacc": out["gacc"], "hacc": out["hacc"],
                    "aacc": out["aacc"], "loss": state["loss"] + out["loss"], "ig": ig}, None

        # Loss parameters are replicated over pp: make them varying so their VJP inside a branch (which only
        # the last-stage ranks take) does not psum over pp; the sum over ranks happens once, at the end.
        lp_local = jax.tree.map(lambda a: varying_over(a, (pp_axis,)), loss_params)
        init = {"act": varying(prog.acts.zeros((plan.num_act_slots + 1,))),
                "sub": varying(prog.subs.zeros((plan.num_act_slots + 1,))) if prog.subs else {},
                "grad": varying(prog.cots.zeros((plan.num_grad_slots + 1,))),
                "gacc": jax.tree.map(jnp.zeros_like, params),
                "hacc": jax.tree.map(jnp.zeros_like, lp_local),
                "aacc": varying(prog.aux.zeros((nc,))) if has_aux else {},
                "loss": varying_over(jnp.zeros((), jnp.float32), vary_axes),
                "ig": varying(prog.cots.zeros((M + 1,))) if input_grads else {}}
        final, _ = lax.scan(tick, init, rows)
        loss = lax.psum(final["loss"], pp_axis)
        if batch_axes:  # each shard holds its part of the mean already (scale includes 1/batch_shards)
            loss = lax.psum(loss, tuple(batch_axes))
        hgrads = jax.tree.map(lambda h: lax.psum(h, pp_axis), final["hacc"])
        grads = {k: v.reshape(packed[k].shape) for k, v in final["gacc"].items()}
        ig = ()
        if input_grads:
            ig_flat = {k: lax.psum(v[:M], pp_axis) for k, v in final["ig"].items()}
            ig = prog.cots.unpack(0, ig_flat, lead=(M,))
        aux = ()
        if has_aux:
            aacc = final["aacc"]
            if batch_axes:
                aacc = {k: lax.psum(v, tuple(batch_axes)) for k, v in aacc.items()}
            aux = {k: v[None] for k, v in aacc.items()}
        return loss, grads, hgrads, ig, aux

    return body


OUTPUTS = ("stash", "sub_stash", "act_msg", "grad_msg", "gy", "loss", "gacc", "hacc", "aacc")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _activation_only(fn: Callable, has_aux: bool) -> Callable:
    """The differentiated part of a stage: its activation output (aux outputs are statistics)."""
    if not has_aux:
        return fn
    return lambda p, x: fn(p, x)[0]


def channel_flags(plan: PipelinePlan) -> dict[str, np.ndarray]:
    """{"send_act_d" / "send_grad_d": [1, num_ticks] int32}: 1 where some rank receives over shift d in that
    tick. The same on every rank (pass them replicated): a tick whose channel carries nothing skips its
    ppermute, whose rendezvous of all ranks is the largest fixed cost of a tick."""
    out = {}
    for kind, chans, trash in (("act", plan.act_channels, plan.num_act_slots),
                               ("grad", plan.grad_channels, plan.num_grad_slots)):
        for d in chans:
            if d:
                used = (plan.tables[f"recv_{kind}_{d}"] != trash).any(axis=0)
                out[f"send_{kind}_{d}"] = used.astype(np.int32)[None]
    return out


def _send(msg: dict, flag, axis: str, perm: list[tuple[int, int]]) -> dict:
    """ppermute when `flag` (the same on every rank) says the channel carries a value this tick; otherwise
    the message stays (the receivers write it to their trash slot)."""
    return lax.cond(flag == 1, lambda m: lax.ppermute(m, axis, perm), lambda m: m, msg)


def _shift(n: int, d: int) -> list[tuple[int, int]]:
    """Cyclic shift by d ranks (wrapped sends land in the receiver's trash slot when unused)."""
    return [(i, (i + d) % n) for i in range(n)]


def describe_variants(variants: tuple[tuple[int, int, int], ...]) -> list[str]:
    """Readable names of the branches: "F&BW(f=1,b=2)"."""
    out = []
    for code, kf, kb in variants:
        parts = [f"f={kf}"] * (kf >= 0) + [f"b={kb}"] * (kb >= 0)
        out.append(CODE_NAMES[code] + (f"({','.join(parts)})" if parts else ""))
    return out
