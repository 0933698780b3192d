"""Fine-tuning a DeepSeek model under a pipeline schedule over `pp` with its experts over `ep`.

The pipeline's stages are the model's own layers, cut into contiguous runs (`split_layers`): stage 0 also
embeds the tokens, the last stage also applies the final norm and the head, so stages differ in parameters
and in what they take and give (token ids in, [b, S, H] between, logits out). Within a stage every MoE layer
runs `moe_layer` over the `ep` axis: token rows are split over `ep` (data-parallel attention), routed experts
too. Orbax checkpoints (`seekax.storage.checkpoint.TrainCheckpointer`) hold the per-stage params and the
optimizer state; `merge_stages` gives back the model's params for `save_checkpoint` or serving.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from seekax.ir.validate import check_choice, check_int, fail
from seekax.models.deepseek import decoder_layer, logits_from_hidden, loss_fn
from seekax.models.deepseek_config import DeepseekConfig

SCHEDULES = ("1f1b", "gpipe", "zb1p", "interleaved", "dualpipe", "dualpipev")
EXPERT_LEAVES = ("w1", "w2", "w3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """microbatch_size sequences per micro-batch (split over ep), microbatches per step."""

    steps: int = 10
    pp: int = 2
    ep: int = 2
    schedule: str = "1f1b"
    microbatches: int = 4
    microbatch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    ckpt_every: int = 0
    seed: int = 0

    def __post_init__(self):
        check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("steps", "pp", "ep", "microbatches", "microbatch_size"):
            check_int(name, getattr(self, name), min_value=1)
        check_int("ckpt_every", self.ckpt_every, min_value=0)
        if self.microbatch_size % self.ep:
            raise fail("microbatch_size", self.microbatch_size, f"a multiple of ep={self.ep}")


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous runs of layers, as even as possible, earlier stages taking the remainder."""
    if num_layers < num_stages:
        raise fail("num_hidden_layers", num_layers, f">= the schedule's {num_stages} stages (one layer a stage)")
    base, extra = divmod(num_layers, num_stages)
    out, at = [], 0
    for s in range(num_stages):
        n = base + (s < extra)
        out.append(range(at, at + n))
        at += n
    return out


def split_stages(params: dict, stages: list[range]) -> list[dict]:
    """The model's params as one tree per stage: {"embed"} on the first, {"norm", "head"} on the last."""
    if "head" not in params:
        raise fail("params['head']", "missing (tied embeddings)", "an untied head: the first and last pipeline "
                   "stages cannot share the embedding")
    out = []
    for s, layers in enumerate(stages):
        p: dict[str, Any] = {"layers": [params["layers"][i] for i in layers]}
        if s == 0:
            p["embed"] = params["embed"]
        if s == len(stages) - 1:
            p["norm"], p["head"] = params["norm"], params["head"]
        out.append(p)
    return out


def merge_stages(stage_params: list[dict], params_like: dict | None = None) -> dict:
    """The inverse of `split_stages` (MTP modules, not trained here, taken from params_like)."""
    params = {"embed": stage_params[0]["embed"], "norm": stage_params[-1]["norm"], "head": stage_params[-1]["head"],
              "layers": [layer for p in stage_params for layer in p["layers"]]}
    if params_like is not None and "mtp" in params_like:
        params["mtp"] = params_like["mtp"]
    return params


def stage_fns(cfg: DeepseekConfig, stages: list[range], ep_axis: str | None, backend: str = "auto") -> list:
    """One function per stage: f(stage_params, x) -> next x (token ids -> hidden -> ... -> logits)."""
    fns = []
    for s, layers in enumerate(stages):
        first, last = s == 0, s == len(stages) - 1

        def fn(p, x, layers=layers, first=first, last=last):
            h = jnp.take(p["embed"], x, axis=0) if first else x                      # [b, S, H]
            for j, i in enumerate(layers):
                h, _ = decoder_layer(p["layers"][j], h, cfg, i, ep_axis=ep_axis, backend=backend)
            return logits_from_hidden(p, h, cfg) if last else h

        fns.append(fn)
    return fns


def stage_specs(stage_params: list[dict], ep_axis: str | None) -> list:
    """PartitionSpecs of each stage's per-stage dims: routed expert weights split over `ep_axis`."""
    def spec(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if ep_axis and "moe" in names and names[-1] in EXPERT_LEAVES:
            return P(ep_axis, *([None] * (leaf.ndim - 1)))
        return P(*([None] * leaf.ndim))

    return [jax.tree_util.tree_map_with_path(spec, p) for p in stage_params]


class Trainer:
    """Owns the mesh ("pp", "ep"), per-stage params, optimizer state and the compiled step."""

    def __init__(self, params: dict, cfg: DeepseekConfig, tcfg: TrainConfig, *, devices=None, backend: str = "auto"):
        from seekax.layers.linear import Fp8Weight
        from seekax.layers.pipeline import make_pipeline_train_step
        from seekax.schedules.registry import make_schedule

        if any(isinstance(x, Fp8Weight) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Fp8Weight))):
            raise fail("params", "FP8 weights", "float weights to train (seekax.models.deepseek.dequantize_params)")
        if cfg.moe.num_experts % tcfg.ep:
            raise fail("ep", tcfg.ep, f"a divisor of n_routed_experts={cfg.moe.num_experts}")
        self.cfg, self.tcfg = cfg, tcfg
        self.schedule = make_schedule(tcfg.schedule, tcfg.pp, tcfg.microbatches)
        self.stages = split_layers(cfg.num_layers, self.schedule.num_stages)
        n = tcfg.pp * tcfg.ep
        devices = np.asarray(jax.devices()[:n] if devices is None else devices)
        if devices.size != n:
            raise fail("pp * ep", n, f"<= the {len(jax.devices())} devices available")
        self.mesh = jax.sharding.Mesh(devices.reshape(tcfg.pp, tcfg.ep), ("pp", "ep"),
                                      axis_types=(jax.sharding.AxisType.Explicit,) * 2)
        self.params_like = params
        self._replicated = replicated = jax.sharding.NamedSharding(self.mesh, P())
        self.params = jax.device_put(split_stages(params, self.stages), replicated)
        self.opt = optax.adamw(tcfg.lr, weight_decay=tcfg.weight_decay)
        self.opt_state = jax.device_put(self.opt.init(self.params), replicated)
        self._step = make_pipeline_train_step(self.schedule, stage_fns(cfg, self.stages, "ep", backend), loss_fn,
                                              mesh=self.mesh, param_specs=stage_specs(self.params, "ep"),
                                              batch_spec=P("ep"))
        # replicated in, replicated out: the next step reuses the compiled pipeline program
        self._apply = jax.jit(self._apply_fn, out_shardings=replicated)
        self.step_count = 0
        self.history: list[dict] = []

    def _apply_fn(self, params, opt_state, grads):
        grads = jax.tree.map(lambda g: jax.sharding.reshard(g, self._replicated), grads)
        updates, opt_state = self.opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def loss_and_grads(self, tokens) -> tuple[jax.Array, list]:
        """tokens [M, b, S + 1] int32 -> (mean next-token loss, per-stage grads)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        m, b = self.tcfg.microbatches, self.tcfg.microbatch_size
        if tokens.ndim != 3 or tokens.shape[:2] != (m, b) or tokens.shape[2] < 2:
            raise fail("tokens.shape", tuple(tokens.shape), f"[microbatches={m}, microbatch_size={b}, seq_len + 1]")
        return self._step(self.params, tokens[..., :-1], tokens[..., 1:])

    def train_step(self, tokens) -> float:
        t0 = time.perf_counter()
        loss, grads = self.loss_and_grads(tokens)
        self.params, self.opt_state = self._apply(self.params, self.opt_state, grads)
        self.step_count += 1
        loss = float(loss)
        self.history.append({"step": self.step_count, "loss": loss, "seconds": time.perf_counter() - t0})
        return loss

    def model_params(self) -> dict:
        """The trained params in the model's layout (`seekax.models.deepseek`), as host arrays."""
        return merge_stages(jax.device_get(self.params), self.params_like)


def tokens_from_rows(rows: np.ndarray, tcfg: TrainConfig, vocab: int) -> np.ndarray:
    """A loader batch [M * b, S + 1] -> [M, b, S + 1]; ids must lie in [0, vocab)."""
    rows = np.asarray(rows)
    if rows.size and (rows.min() < 0 or rows.max() >= vocab):
        raise fail("data token ids", f"[{rows.min()}, {rows.max()}]", f"in [0, vocab={vocab}) (tokenize with the "
                   "model's tokenizer)")
    return rows.reshape(tcfg.microbatches, tcfg.microbatch_size, rows.shape[-1])
