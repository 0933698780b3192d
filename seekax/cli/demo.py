"""`seekax demo`: train a tiny DeepSeek-V3 with every seekax part, then serve it (the README's main job).

Embedded default: 8 CPU host devices as a (pp=2) x (ep=4) mesh, a local data directory. On a Hopper GPU
machine the same command runs the Mosaic kernels (backend "auto"). `--processes 2` starts two JAX processes
on loopback (gloo collectives, 4 devices each) forming one 8-device mesh: the multi-host code path.
"""

from __future__ import annotations

import os

from seekax.ir.validate import fail
from seekax.schedules.registry import GENERATORS

# Library parameter -> the flag's dest, for errors that name the flag; pp and ep also name the flags when a
# message quotes them ("a multiple of ep=4").
PARAMS = {"num_ranks": "pp", "num_microbatches": "microbatches", "pp": "pp", "ep": "ep"}


def register(sub) -> None:
    p = sub.add_parser("demo", help="train + serve a tiny DeepSeek-V3 end to end (the main job)",
                       description=__doc__, params=PARAMS)
    p.add_argument("--steps", type=int, default=150, help="training steps")
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks (mesh axis 'pp')")
    p.add_argument("--ep", type=int, default=4, help="expert-parallel ranks (mesh axis 'ep')")
    p.add_argument("--schedule", default="dualpipev", choices=sorted(GENERATORS), help="pipeline schedule")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: 4, or the schedule's stages if more)")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per training step")
    p.add_argument("--microbatch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=128, help="training context (serving prompts stay inside it)")
    p.add_argument("--docs", type=int, default=4000, help="documents in the generated corpus")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--eplb-every", type=int, default=50, help="EPLB rebalance every N steps (0: never)")
    p.add_argument("--ckpt-every", type=int, default=50, help="async checkpoint every N steps (0: never)")
    p.add_argument("--gen", type=int, default=32, help="tokens to generate per request when serving")
    p.add_argument("--workdir", default=".seekax-demo",
                   help="data, checkpoints and the loss log (missing folders are created)")
    p.add_argument("--report", default="report", help="folder for the report: PNGs, summary (created if missing)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--no-serve", action="store_true", help="skip the serving phase")
    p.add_argument("--processes", type=int, default=1, help="JAX processes on loopback (each gets 8/N devices)")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's index when launched per host (with --processes and --coordinator)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (jax.distributed coordinator)")
    p.add_argument("--seed", type=int, default=0, help="corpus, initialisation and data order seed")
    p.set_defaults(func=run)


def configure_env(argv: list[str]) -> None:
    """Before jax is imported: give this process its CPU host devices (8, or 8 / --processes per worker)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    n = 8
    if "--processes" in argv and "--process-id" in argv:
        n = 8 // int(argv[argv.index("--processes") + 1])
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def check_args(args) -> None:
    """The checks the demo would meet minutes in (after preparing its data), made before any work."""
    from seekax.demo.main import train_config
    from seekax.schedules.registry import make_schedule

    train_config(args)
    schedule = make_schedule(args.schedule, args.pp, args.microbatches)
    if args.layers is not None and args.layers < schedule.num_stages:
        raise fail("layers", args.layers, f">= the {args.schedule} schedule's {schedule.num_stages} stages")
    n = args.processes
    if n < 1 or 8 % n or args.ep % n:
        raise fail("processes", n, f"a divisor of 8 and of ep={args.ep}")
    if n == 1 and args.process_id is None:
        import jax

        if args.pp * args.ep != jax.device_count():
            raise fail("pp", args.pp, f"pp * ep == {jax.device_count()} devices (ep={args.ep})")


def run(args) -> int:
    from seekax.demo import main as demo
    from seekax.storage.extras import require_data_extra

    require_data_extra(feature="seekax demo")
    check_args(args)
    return demo.main(args)
