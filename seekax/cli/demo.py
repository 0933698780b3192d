"""`seekax demo`: train a tiny DeepSeek-V3 with every seekax part, then serve it (the README's main job).

Embedded default: 8 CPU host devices as a (pp=2) x (ep=4) mesh, a local data directory. On a Hopper GPU
machine the same command runs the Mosaic kernels (backend "auto"). `--processes 2` starts two JAX processes
on loopback (gloo collectives, 4 devices each) forming one 8-device mesh: the multi-host code path.
"""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("demo", help="train + serve a tiny DeepSeek-V3 end to end (the main job)",
                       description=__doc__)
    p.add_argument("--steps", type=int, default=150, help="training steps")
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks (mesh axis 'pp')")
    p.add_argument("--ep", type=int, default=4, help="expert-parallel ranks (mesh axis 'ep')")
    p.add_argument("--schedule", default="dualpipev", help="dualpipev | dualpipe | 1f1b | zb1p | gpipe | interleaved")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the schedule's stages)")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--microbatch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=128, help="training context (serving prompts stay inside it)")
    p.add_argument("--docs", type=int, default=4000, help="documents in the generated corpus")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eplb-every", type=int, default=50, help="EPLB rebalance every N steps (0: never)")
    p.add_argument("--ckpt-every", type=int, default=50, help="async checkpoint every N steps (0: never)")
    p.add_argument("--gen", type=int, default=32, help="tokens to generate per request when serving")
    p.add_argument("--workdir", default=".seekax-demo", help="data, checkpoints and the loss log")
    p.add_argument("--report", default="report", help="folder for the report (PNGs, summary)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--no-serve", action="store_true", help="skip the serving phase")
    p.add_argument("--processes", type=int, default=1, help="JAX processes on loopback (each gets 8/N devices)")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's index when launched per host (with --processes and --coordinator)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (jax.distributed coordinator)")
    p.add_argument("--seed", type=int, default=0)
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


def run(args) -> int:
    from seekax.demo import main as demo

    return demo.main(args)
