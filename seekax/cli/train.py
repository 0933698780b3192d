"""`seekax train`: fine-tune a Hugging Face DeepSeek-V2/V3 directory on a token sample store.

The model's layers are the pipeline stages (contiguous runs; the first also embeds, the last also applies the
head) under --schedule over --pp ranks; MoE experts and token rows are split over --ep ranks, with
--redundant-experts EPLB replica slots rebalanced every --eplb-every steps; --overlap runs MoE stages as
sub-steps whose all-to-alls overlap the other F&B stream under dualpipe(v). On a CPU the
pp * ep devices are host devices (set before jax loads). Records of the store are sequences of seq_len + 1
token ids of the model's tokenizer. --ckpt-dir keeps orbax checkpoints of the per-stage params, optimizer,
EPLB and loader state every --ckpt-every steps; --save writes the trained model as a Hugging Face directory
(config, safetensors, and the source's tokenizer files) that `seekax generate` serves.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

PARAMS = {"model_dir": "model", "microbatch_size": "microbatch_size", "store.kind": "data"}


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a Hugging Face DeepSeek checkpoint (pipeline x expert parallel)",
                       description=__doc__, params=PARAMS)
    p.add_argument("--model", required=True, help="checkpoint directory: config.json, *.safetensors, tokenizer")
    p.add_argument("--data", required=True, help="a token sample store (seekax data prepare)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel ranks (token rows split too)")
    p.add_argument("--schedule", default="1f1b", help="1f1b, gpipe, zb1p, interleaved, dualpipe, dualpipev")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches a step")
    p.add_argument("--microbatch-size", type=int, default=4, help="sequences a micro-batch (a multiple of --ep)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps, then cosine decay (0: constant lr)")
    p.add_argument("--clip-norm", type=float, default=0.0, help="clip gradients to this global norm (0: off)")
    p.add_argument("--overlap", action="store_true",
                   help="MoE stages as attention/dispatch/experts/combine sub-steps: under dualpipe(v) an F&B "
                        "runs one micro-batch's all-to-all under the other's compute")
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="EPLB replica slots a MoE layer (0: no EPLB); n_routed_experts + this a multiple of --ep")
    p.add_argument("--eplb-every", type=int, default=0, help="rebalance the experts every N steps")
    p.add_argument("--fp8", action="store_true",
                   help="train the attention projections, dense MLPs and the shared and routed experts through FP8 "
                        "GEMMs (fp8_linear, grouped_fp8_linear; the weights stay float)")
    p.add_argument("--mtp-weight", type=float, default=0.0,
                   help="train the multi-token-prediction modules with this weight on their loss (0: not)")
    p.add_argument("--ckpt-dir", default=None, help="orbax checkpoints here")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--save", default=None, help="write the trained model as a Hugging Face directory here")
    p.add_argument("--json", action="store_true", help="print the loss history as one JSON object")
    p.add_argument("--backend", choices=("auto", "xla", "mosaic", "interpret"), default="auto",
                   help="kernel backend of the ops")
    p.set_defaults(func=run)


def configure_env(argv: list[str]) -> None:
    """Before jax is imported: as many CPU host devices as --pp x --ep (a GPU machine ignores the flag)."""
    def flag(name: str, default: int) -> int:
        for i, a in enumerate(argv):
            if a == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(name + "="):
                value = a.split("=", 1)[1]
            else:
                continue
            return int(value) if value.isdigit() else default
        return default

    n = max(flag("--pp", 2) * flag("--ep", 2), 1)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# what a Hugging Face directory holds besides config and weights: copied from --model into --save
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def run(args) -> int:
    import numpy as np

    import jax

    from seekax.models.checkpoint import load_checkpoint, save_checkpoint
    from seekax.models.deepseek import dequantize_params, has_fp8_weights
    from seekax.models.train import Trainer, TrainConfig, tokens_from_rows
    from seekax.storage.loader import Loader, LoaderConfig

    tcfg = TrainConfig(steps=args.steps, pp=args.pp, ep=args.ep, schedule=args.schedule,
                       microbatches=args.microbatches, microbatch_size=args.microbatch_size, lr=args.lr,
                       warmup=args.warmup, clip_norm=args.clip_norm, overlap=args.overlap,
                       ckpt_every=args.ckpt_every, redundant_experts=args.redundant_experts,
                       eplb_every=args.eplb_every, fp8=args.fp8, mtp_weight=args.mtp_weight)
    loader = Loader(args.data, LoaderConfig(global_batch_size=tcfg.microbatches * tcfg.microbatch_size,
                                            seed=tcfg.seed, process_index=0, process_count=1))
    cfg, params = load_checkpoint(args.model, dtype=np.float32, progress=sys.stderr.isatty())  # MTP modules kept
    if has_fp8_weights(params):
        # DeepSeek's native FP8 release: train float master weights (--fp8: through FP8 GEMMs, DeepSeek-V3's way)
        print("seekax train: the checkpoint's FP8 weights are dequantised to float32 master weights",
              file=sys.stderr)
        params = jax.tree.map(np.asarray, dequantize_params(params))
    trainer = Trainer(params, cfg, tcfg, backend=args.backend)
    ckpt = None
    if args.ckpt_dir:
        from seekax.storage.checkpoint import TrainCheckpointer

        ckpt = TrainCheckpointer(args.ckpt_dir, max_to_keep=2)
    for step in range(1, tcfg.steps + 1):
        loss = trainer.train_step(tokens_from_rows(next(loader), tcfg, cfg.vocab))
        if not args.json:
            h = trainer.history[-1]
            print(f"step {step}: loss {loss:.4f} ({h['seconds']:.2f} s)", flush=True)
        if ckpt and (step == tcfg.steps or (tcfg.ckpt_every and step % tcfg.ckpt_every == 0)):
            trainer.save(ckpt, loader.get_state())
    if ckpt:
        ckpt.close()
    if args.save:
        save_checkpoint(trainer.model_params(), cfg, args.save, progress=False)
        for name in TOKENIZER_FILES:
            src = os.path.join(args.model, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(args.save, name))
    if args.json:
        print(json.dumps({"stages": [[r.start, r.stop] for r in trainer.stages], "history": trainer.history,
                          "eplb": trainer.eplb_history}))
    return 0
