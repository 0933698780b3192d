"""The end-to-end demo (`seekax demo`): prepare data -> train (DualPipeV over pp, EP over ep, EPLB, async
checkpoints, a resume check) -> serve (batched decode over paged latent caches, KV-store prefix reuse)
-> report (loss curve, schedule picture, EPLB chart, summary)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_processes(args) -> int:
    """`--processes N`: start N workers of this command on loopback and wait for them (worker 0 reports)."""
    n = args.processes
    if n < 1 or 8 % n or args.ep % n:
        print(f"seekax demo: processes={n}: expected a divisor of 8 and of ep={args.ep}", file=sys.stderr)
        return 2
    coord = f"127.0.0.1:{_free_port()}"
    argv = [a for a in sys.argv[1:]]
    if argv[:1] != ["demo"]:
        argv = ["demo"] + argv
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "seekax", *argv, "--process-id", str(i), "--coordinator", coord],
                              env=env) for i in range(n)]
    rcs = [p.wait() for p in procs]
    return max(rcs)


def main(args) -> int:
    if args.processes > 1 and args.process_id is None:
        return launch_processes(args)
    import jax

    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.processes,
                                   process_id=args.process_id)
    from jax.experimental import multihost_utils

    from seekax.demo import report as R
    from seekax.models import tiny as M
    from seekax.demo.data import prepare
    from seekax.demo.train import TrainConfig, Trainer
    from seekax.schedules.registry import make_schedule

    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    work, report = Path(args.workdir), Path(args.report)
    run_dir = work / "run"
    t_start = time.perf_counter()
    devs = jax.devices()
    say(f"seekax demo: {len(devs)} {devs[0].platform} devices in {jax.process_count()} process(es); "
        f"mesh pp={args.pp} x ep={args.ep}, schedule {args.schedule}")

    # ---- 1. data ----------------------------------------------------------------------------------------
    if lead:
        t0 = time.perf_counter()
        manifest = prepare(work / "data", num_docs=args.docs, seq_len=args.seq_len, seed=args.seed,
                           num_workers=2)
        say(f"[data] {manifest['num_records']} packed rows of {args.seq_len + 1} tokens in "
            f"{len(manifest['shards'])} shard(s) ({time.perf_counter() - t0:.1f} s)")
        if not args.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        report.mkdir(parents=True, exist_ok=True)
    multihost_utils.sync_global_devices("seekax-demo-data")

    # ---- 2. train ---------------------------------------------------------------------------------------
    schedule = make_schedule(args.schedule, args.pp, args.microbatches)
    layers = args.layers or schedule.num_stages
    mc = M.ModelConfig(seq_len=args.seq_len, num_layers=layers, num_slots=3 * args.ep)
    tc = TrainConfig(steps=args.steps, pp=args.pp, ep=args.ep, schedule=args.schedule,
                     microbatches=args.microbatches, microbatch_size=args.microbatch_size, lr=args.lr,
                     eplb_every=args.eplb_every, ckpt_every=args.ckpt_every, seed=args.seed)
    trainer = Trainer(mc, tc, store_path=work / "data" / "store", run_dir=run_dir, log=say)
    if args.resume and trainer.ckpt and trainer.ckpt.latest_step() is not None:
        say(f"[train] resumed from checkpoint step {trainer.restore()}")
    loss_log = (run_dir / "losses.jsonl").open("a") if lead else open(os.devnull, "w")
    resume_check = None
    check_at = (args.steps // 2 // max(args.ckpt_every, 1)) * args.ckpt_every if args.ckpt_every else 0
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=trainer.step, desc="train", unit="step", disable=not lead, leave=True)
    t_train = time.perf_counter()
    while trainer.step < args.steps:
        loss = trainer.train_step()
        loss_log.write(json.dumps({"step": trainer.step, "loss": loss}) + "\n")
        loss_log.flush()
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
        if check_at and trainer.step == check_at and resume_check is None:
            resume_check = _resume_check(trainer)
            say(f"\n[train] resume check at step {check_at}: next loss in memory {resume_check['in_memory']:.6f}, "
                f"after restoring the checkpoint {resume_check['restored']:.6f} "
                f"({'identical' if resume_check['identical'] else 'DIFFERENT'})")
    bar.close()
    train_seconds = time.perf_counter() - t_train
    trainer.close()
    loss_log.close()
    hist = trainer.history

    # ---- 3. serve ---------------------------------------------------------------------------------------
    serve = {}
    if lead and not args.no_serve:
        serve = _serve(trainer, mc, work, args.gen, say)

    # ---- 4. report --------------------------------------------------------------------------------------
    if not lead:
        return 0
    losses = hist["loss"]
    sim = schedule.simulate()
    bubble_frac = float(sum(sim.bubble) / (sim.makespan * schedule.num_ranks))
    steady = hist["step_seconds"][min(3, len(hist["step_seconds"]) - 1):] or hist["step_seconds"]
    tokens_per_step = tc.global_batch * args.seq_len
    eplb = hist["eplb"]
    summary = {
        "devices": f"{len(devs)} x {devs[0].platform} in {jax.process_count()} process(es)",
        "mesh": f"pp={args.pp} x ep={args.ep}", "schedule": args.schedule, "layers": layers,
        "params": M.param_count(trainer.params), "steps": trainer.step,
        "loss_start": float(np.mean(losses[:5])) if losses else None,
        "loss_end": float(np.mean(losses[-5:])) if losses else None,
        "train_tokens_per_s": tokens_per_step / float(np.median(steady)) if steady else None,
        "train_seconds": train_seconds,
        "schedule_bubble_fraction": bubble_frac,
        "eplb_rebalances": len(eplb),
        "eplb_max_over_mean_before": float(np.mean(eplb[0]["before_max_over_mean"])) if eplb else None,
        "eplb_max_over_mean_after": float(np.mean(eplb[-1]["after_max_over_mean"])) if eplb else None,
        "ckpt_blocking_ms_first_then_median": ([hist["ckpt_blocking_ms"][0],
                                                float(np.median(hist["ckpt_blocking_ms"][1:]))]
                                              if len(hist["ckpt_blocking_ms"]) > 1 else hist["ckpt_blocking_ms"]),
        "resume_next_loss_identical": resume_check["identical"] if resume_check else None,
        **serve,
        "wall_seconds": time.perf_counter() - t_start,
    }
    if losses:
        R.loss_curve(losses, report / "loss_curve.png")
    from seekax.schedules.visualise import to_png

    to_png(schedule, str(report / "schedule.png"))
    R.eplb_chart(eplb, report / "eplb_balance.png")
    trainer.write_history(report / "history.json")
    say(R.write_summary(report, summary))
    say(f"report: {report.resolve()} (loss_curve.png, schedule.png, eplb_balance.png, summary.json)")
    return 0


def _resume_check(trainer) -> dict:
    """Compute the next step's loss from memory, then restore the just-written checkpoint (params, optimizer,
    placement, loader position) and compute it again: a correct resume reproduces it exactly."""
    trainer.ckpt.wait()
    state = trainer.loader.get_state()
    in_memory = trainer.peek_loss(trainer.next_batch())
    trainer.restore(trainer.step)
    restored = trainer.peek_loss(trainer.next_batch())
    trainer.loader.set_state(state)
    return {"step": trainer.step, "in_memory": in_memory, "restored": restored, "identical": in_memory == restored}


def _page_aligned_story(make_corpus, page: int = 64) -> str:
    """A shared prompt prefix that fills exactly one KV page and ends on the subject of a story's second
    sentence ("story N: <sentence>. <name>"), the story number's digits chosen to make `page` characters;
    each request then continues it with its own verb."""
    for story in make_corpus(500, seed=12345):
        body = story.split(": ", 1)[1]
        cut = body.index(". ") + 2
        text = body[: cut + body[cut:].index(" ")]                   # "<sentence>. <name>"
        digits = page - len("story : ") - len(text)
        if 1 <= digits <= 4:
            return f"story {int('1' + '7' * (digits - 1))}: {text}"
    raise RuntimeError("no page-aligned story in the generated corpus")


def _serve(trainer, mc, work: Path, gen: int, say) -> dict:
    """Two batches of requests sharing a one-page (64-token) prompt prefix: the first misses the KV store and
    fills it, the second reuses the prefix page. Both are checked against the XLA reference decode."""
    from seekax.demo.data import make_corpus, to_model_vocab
    from seekax.demo.serve import Server, host_params, open_kv_store, reference_generate
    from seekax.storage.tokens import encode

    params = host_params(trainer.params)
    kv_dir = work / "kvstore"
    shutil.rmtree(kv_dir, ignore_errors=True)
    kv = open_kv_store(kv_dir, mc)
    server = Server(params, mc, kv_store=kv)
    prefix = to_model_vocab(encode(_page_aligned_story(make_corpus)), mc.vocab)            # 64 tokens: one page
    asks = [f" {v} {n}" for v, n in zip(("gives", "sells", "sends", "shows", "lends", "sells", "gives", "lends"),
                                        (3, 5, 2, 8, 4, 7, 9, 6))]
    prompts = np.stack([np.concatenate([prefix, to_model_vocab(encode(a), mc.vocab)]) for a in asks]).astype(np.int32)
    say(f"[serve] batch of {len(prompts)} requests, prompt {prompts.shape[1]} tokens ({len(prefix)} shared), "
        f"generating {gen} each")
    first = server.generate(prompts, gen)
    second = server.generate(prompts, gen)
    ref_tokens, ref_logits = reference_generate(params, mc, prompts, gen)
    match = bool((ref_tokens == first.tokens).all() and (ref_tokens == second.tokens).all())
    max_dlogit = float(max(np.abs(ref_logits - first.logits).max(), np.abs(ref_logits - second.logits).max()))
    stats = kv.stats()
    kv.close()
    from seekax.storage.tokens import decode

    for row in first.tokens[:4]:
        say("   ..." + repr(decode(row[len(prefix) - 24:])))
    toks = len(prompts) * gen
    return {
        "decode_tokens_per_s": toks / second.decode_seconds,
        "prefill_tokens_per_request_miss_then_hit": [prompts.shape[1] - first.matched_tokens,
                                                     prompts.shape[1] - second.matched_tokens],
        "kv_prefix_tokens_reused": second.matched_tokens,
        "kv_page_hit_rate": stats["hits"] / max(stats["hits"] + stats["misses"], 1),
        "decode_equals_xla_reference": match,
        "decode_max_logit_diff_vs_reference": max_dlogit,
    }
