"""The end-to-end demo (`seekax demo`): a tiny DeepSeek-V3 written as a Hugging Face directory -> data prepared
with its tokenizer -> train (its layers as pipeline stages under DualPipeV over pp with F&B overlap of the MoE
all-to-alls, experts over ep, EPLB, async checkpoints, a resume check) -> save as a Hugging Face directory,
reload and serve it through `seekax generate`'s code path (continuous batching over paged latent caches,
KV-store prefix reuse, checked against the full forward) -> report (loss curve, schedule picture, EPLB chart,
summary)."""

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
    from seekax.demo.data import make_corpus, prepare
    from seekax.demo.model import TOKENIZER_FILES, make_model_dir
    from seekax.demo.train import DemoTrainer
    from seekax.models.checkpoint import load_checkpoint, save_checkpoint
    from seekax.schedules.registry import make_schedule

    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    work, report = Path(args.workdir), Path(args.report)
    run_dir, init_dir, trained_dir = work / "run", work / "model-init", work / "model"
    t_start = time.perf_counter()
    devs = jax.devices()
    schedule = make_schedule(args.schedule, args.pp, args.microbatches)
    layers = args.layers or max(4, schedule.num_stages)
    say(f"seekax demo: {len(devs)} {devs[0].platform} devices in {jax.process_count()} process(es); "
        f"mesh pp={args.pp} x ep={args.ep}, schedule {args.schedule}")

    # ---- 1. model directory and data -------------------------------------------------------------------
    if lead:
        t0 = time.perf_counter()
        if not args.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        make_model_dir(init_dir, make_corpus(args.docs, args.seed), num_layers=layers, seed=args.seed)
        manifest = prepare(work / "data", num_docs=args.docs, seq_len=args.seq_len, seed=args.seed,
                           tokenizer=init_dir / "tokenizer.json", num_workers=2)
        say(f"[data] {init_dir}: tiny DeepSeek-V3 ({layers} layers) and a BPE tokenizer trained on the corpus; "
            f"{manifest['num_records']} packed rows of {args.seq_len + 1} tokens in {len(manifest['shards'])} "
            f"shard(s) ({time.perf_counter() - t0:.1f} s)")
        report.mkdir(parents=True, exist_ok=True)
    multihost_utils.sync_global_devices("seekax-demo-data")

    # ---- 2. train ---------------------------------------------------------------------------------------
    cfg, params = load_checkpoint(init_dir, dtype=np.float32, progress=False)
    tc = train_config(args)
    trainer = DemoTrainer(params, cfg, tc, store_path=work / "data" / "store", run_dir=run_dir,
                          tokenizer=init_dir / "tokenizer.json", log=say)
    stages = ", ".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else f"{r.start}" for r in trainer.trainer.stages)
    say(f"[train] layers per stage: {stages}; MoE stages as attention/dispatch/experts/combine sub-steps "
        f"(F&B overlap); {tc.redundant_experts} EPLB replica slots a MoE layer")
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

    # ---- 3. save, reload, serve -------------------------------------------------------------------------
    serve = {}
    if lead and not args.no_serve:
        from seekax.demo.serve import serve as run_serve

        save_checkpoint(trainer.trainer.model_params(), cfg, trained_dir, progress=False)
        for name in TOKENIZER_FILES:
            shutil.copyfile(init_dir / name, trained_dir / name)
        say(f"[save] trained model written as a Hugging Face directory: {trained_dir}")
        serve = run_serve(trained_dir, work / "kvstore", demo_prompts(init_dir), args.gen, say)

    # ---- 4. report --------------------------------------------------------------------------------------
    if not lead:
        return 0
    losses = hist["loss"]
    sim = schedule.simulate()
    bubble_frac = float(sum(sim.bubble) / (sim.makespan * schedule.num_ranks))
    steady = hist["step_seconds"][min(3, len(hist["step_seconds"]) - 1):] or hist["step_seconds"]
    tokens_per_step = tc.microbatches * tc.microbatch_size * args.seq_len
    eplb = hist["eplb"]
    summary = {
        "devices": f"{len(devs)} x {devs[0].platform} in {jax.process_count()} process(es)",
        "mesh": f"pp={args.pp} x ep={args.ep}", "schedule": args.schedule, "layers": layers,
        "stages": [[r.start, r.stop] for r in trainer.trainer.stages],
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))), "steps": trainer.step,
        "loss_start": float(np.mean(losses[:5])) if losses else None,
        "loss_end": float(np.mean(losses[-5:])) if losses else None,
        "train_tokens_per_s": tokens_per_step / float(np.median(steady)) if steady else None,
        "train_seconds": train_seconds,
        "schedule_bubble_fraction": bubble_frac,
        "eplb_rebalances": len(eplb),
        "eplb_max_over_mean_before": float(np.mean(eplb[0]["max_over_mean_before"])) if eplb else None,
        "eplb_max_over_mean_after": float(np.mean(eplb[-1]["max_over_mean_after"])) if eplb else None,
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


def train_config(args):
    """The demo's training settings from its flags: AdamW with warmup and clipping, one EPLB replica slot a MoE
    layer per EP rank (loads sampled every 5 steps), MoE stages as overlapping sub-steps."""
    from seekax.models.train import TrainConfig

    return TrainConfig(steps=args.steps, pp=args.pp, ep=args.ep, schedule=args.schedule,
                       microbatches=args.microbatches, microbatch_size=args.microbatch_size, lr=args.lr,
                       warmup=20, clip_norm=1.0, redundant_experts=args.ep if args.eplb_every else 0,
                       eplb_every=args.eplb_every, stats_every=max(1, min(5, args.eplb_every)), eplb_window=10,
                       ckpt_every=args.ckpt_every, overlap=True, fp8=True, seed=args.seed)


def _resume_check(trainer) -> dict:
    """Compute the next step's loss from memory, then restore the just-written checkpoint (params, optimizer,
    placement, load window, loader position) and compute it again: a correct resume reproduces it exactly."""
    trainer.ckpt.wait()
    state = trainer.loader.get_state()
    in_memory = trainer.peek_loss(trainer.next_batch())
    trainer.restore(trainer.step)
    restored = trainer.peek_loss(trainer.next_batch())
    trainer.loader.set_state(state)
    return {"step": trainer.step, "in_memory": in_memory, "restored": restored, "identical": in_memory == restored}


ASKS = ("alice gives 3", "bob sells 5", "carol sends 2", "dave shows 8", "erin lends 4", "frank sells 7",
        "grace gives 9", "heidi lends 6")


def demo_prompts(model_dir: Path, page: int = 64) -> list[str]:
    """Eight requests sharing a prompt prefix of more than one KV page (64 tokens of the model's tokenizer):
    stories in the corpus's style, then each request's own opening of the next sentence."""
    from seekax.demo.data import make_corpus
    from seekax.models.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    shared = ""
    for story in make_corpus(50, seed=12345):
        shared = (shared + " " + story.split(": ", 1)[1]).strip()
        if len(tok.encode(shared)) > page + 8:
            return [f"{shared} {a}" for a in ASKS]
    raise RuntimeError("the generated stories are too short for a one-page prompt prefix")
