"""Fine-tuning a DeepSeek model under a pipeline schedule over `pp` with its experts over `ep`.

The pipeline's stages are the model's own layers, cut into contiguous runs (`split_layers`): stage 0 also
embeds the tokens, the last stage also applies the final norm and the head, so stages differ in parameters
and in what they take and give (token ids in, [b, S, H] between, logits out). Within a stage every MoE layer
runs `moe_layer` over the `ep` axis: token rows are split over `ep` (data-parallel attention), routed experts
too. With `redundant_experts` > 0 each MoE layer holds E + redundant physical expert slots (EPLB replicas):
every `eplb_every` steps the expert loads measured on recent batches rebalance the placement and the slots'
weights and Adam moments migrate (`seekax.layers.eplb`); replicas of one expert get the sum of their
gradients, so they stay equal. Orbax checkpoints (`seekax.storage.checkpoint.TrainCheckpointer`) hold the
per-stage params and the optimizer state; `merge_stages` gives back the model's params (one slot per expert)
for `save_checkpoint` or serving.
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
from seekax.models.deepseek import has_fp8_weights, loss_fn
from seekax.models.deepseek_config import DeepseekConfig
from seekax.models.stages import (EXPERT_LEAVES, leaf_key, merge_stages, split_layers, split_stages, stage_fns,
                                  stage_specs)

SCHEDULES = ("1f1b", "gpipe", "zb1p", "interleaved", "dualpipe", "dualpipev")


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
    warmup: int = 0                   # > 0: linear warmup over these steps, then cosine decay to lr / 10
    clip_norm: float = 0.0            # > 0: clip gradients to this global norm
    weight_decay: float = 0.0
    ckpt_every: int = 0
    redundant_experts: int = 0        # EPLB replicas a MoE layer (0: no EPLB)
    eplb_every: int = 0               # rebalance every N steps (with redundant_experts > 0)
    eplb_window: int = 8              # expert-load samples the rebalance sees
    stats_every: int = 1              # with EPLB: sample the expert loads of every N-th batch
    overlap: bool = False             # MoE stages as sub-steps: F&B overlaps one stream's all-to-all with the
                                      # other's compute (DualPipe / DualPipeV)
    fp8: bool = False                 # attention, dense MLP and routed/shared expert GEMMs in FP8
    mtp_weight: float = 0.0           # lambda of the multi-token-prediction loss (0: MTP modules not trained)
    seed: int = 0

    def __post_init__(self):
        check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("steps", "pp", "ep", "microbatches", "microbatch_size", "eplb_window", "stats_every"):
            check_int(name, getattr(self, name), min_value=1)
        for name in ("ckpt_every", "redundant_experts", "eplb_every", "warmup"):
            check_int(name, getattr(self, name), min_value=0)
        if self.microbatch_size % self.ep:
            raise fail("microbatch_size", self.microbatch_size, f"a multiple of ep={self.ep}")
        for name in ("mtp_weight", "clip_norm", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise fail(name, v, "a number >= 0")
        if not isinstance(self.overlap, bool):
            raise fail("overlap", self.overlap, "True or False")

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW at lr (warmup then cosine decay with warmup > 0), after clipping with clip_norm > 0."""
        lr = self.lr
        if self.warmup:
            lr = optax.warmup_cosine_decay_schedule(0.0, self.lr, self.warmup, max(self.steps, self.warmup + 1),
                                                    self.lr * 0.1)
        adam = optax.adamw(lr, weight_decay=self.weight_decay)
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), adam) if self.clip_norm else adam


class Trainer:
    """Owns the mesh ("pp", "ep"), per-stage params, optimizer state and the compiled step."""

    def __init__(self, params: dict, cfg: DeepseekConfig, tcfg: TrainConfig, *, devices=None, backend: str = "auto"):
        from seekax.layers.pipeline import make_pipeline_value_and_grad
        from seekax.schedules.registry import make_schedule

        if has_fp8_weights(params):
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
        self.moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe(i)]
        self.placement = None
        if tcfg.redundant_experts:
            params = self._with_replicas(params)
        if tcfg.fp8:
            params = fp8_projections(params)
        self._replicated = replicated = jax.sharding.NamedSharding(self.mesh, P())
        self.params = jax.device_put(split_stages(params, self.stages), replicated)
        frozen = jax.tree_util.tree_map_with_path(lambda path, _: _key(path) not in ("log2phy", "logcnt"),
                                                  self.params)
        self.opt = optax.masked(tcfg.optimizer(), frozen)
        self.opt_state = jax.device_put(self.opt.init(self.params), replicated)
        self.mtp = None
        if tcfg.mtp_weight:
            if not params.get("mtp"):
                raise fail("mtp_weight", tcfg.mtp_weight, "0 for a model without MTP modules in its params")
            self.mtp = jax.device_put(params["mtp"], replicated)
            self.mtp_opt = tcfg.optimizer()
            self.mtp_opt_state = jax.device_put(self.mtp_opt.init(self.mtp), replicated)
            self._mtp_apply = jax.jit(self._mtp_apply_fn, out_shardings=replicated)
        mtp = self.mtp is not None
        self.stage_fns = stage_fns(cfg, self.stages, "ep", backend, with_hidden=mtp, overlap=tcfg.overlap)
        self._full = make_pipeline_value_and_grad(
            self.schedule, self.stage_fns, mtp_loss_fn(cfg, tcfg.mtp_weight, backend) if mtp else loss_fn,
            mesh=self.mesh, param_specs=stage_specs(self.params, "ep"), batch_spec=P("ep"), with_loss_params=mtp)
        # replicated in, replicated out: the next step reuses the compiled pipeline program
        self._apply = jax.jit(self._apply_fn, out_shardings=replicated)
        self._loads = jax.jit(self._loads_fn)
        self.window = np.zeros((tcfg.eplb_window, len(self.moe_layers), cfg.moe.num_experts), np.float32)
        self.window_count = 0                       # samples added (the window keeps the last eplb_window)
        self.step_count = 0
        self.history: list[dict] = []
        self.eplb_history: list[dict] = []

    # ---- EPLB ------------------------------------------------------------------------------------------------
    def _with_replicas(self, params: dict) -> dict:
        """Routed expert weights per physical slot (slot i holds expert i % E at first) + placement tables."""
        from seekax.ir.placement import ExpertPlacement

        e, r = self.cfg.moe.num_experts, self.tcfg.redundant_experts
        slots = e + r
        if slots % self.tcfg.ep:
            raise fail("redundant_experts", r, f"n_routed_experts + redundant = {slots} a multiple of ep="
                       f"{self.tcfg.ep}")
        self.maxcnt = r + 1
        self.placement = ExpertPlacement.from_phy2log(np.tile(np.arange(slots) % e, (len(self.moe_layers), 1)), e)
        layers = list(params["layers"])
        for j, i in enumerate(self.moe_layers):
            moe = dict(layers[i]["moe"])
            for k in EXPERT_LEAVES:
                moe[k] = np.asarray(moe[k])[self.placement.phy2log[j]]
            moe.update(self._tables(j))
            layers[i] = {**layers[i], "moe": moe}
        return {**params, "layers": layers}

    def _tables(self, j: int) -> dict:
        padded = self.placement.padded(self.maxcnt)
        return {"log2phy": np.asarray(padded.log2phy[j], np.float32), "logcnt": np.asarray(padded.logcnt[j],
                                                                                            np.float32)}

    def _where(self, path) -> tuple[int, int] | None:
        """(stage, index among the MoE layers) of a path into the per-stage trees, or None."""
        keys = [getattr(k, "idx", getattr(k, "key", None)) for k in path]
        for a in range(len(keys) - 2):
            if keys[a + 1] == "layers" and isinstance(keys[a], int) and isinstance(keys[a + 2], int):
                layer = self.stages[keys[a]][keys[a + 2]]
                return (keys[a], self.moe_layers.index(layer)) if layer in self.moe_layers else None
        return None

    def _sync_replicas(self, grads, phy2log):
        """Each replica's gradient becomes the sum over its expert's replicas (replicas stay identical)."""
        e = self.cfg.moe.num_experts

        def sync(path, g):
            where = self._where(path)
            if where is None or _key(path) not in EXPERT_LEAVES:
                return g
            p2l = phy2log[where[1]]
            return jax.ops.segment_sum(g, p2l, num_segments=e)[p2l]

        return jax.tree_util.tree_map_with_path(sync, grads)

    def _loads_fn(self, params, tokens):
        """Tokens routed to each logical expert, [MoE layers, E], by the unpipelined model on tokens [N, S]."""
        from seekax.models.deepseek import forward

        _, experts = forward(merge_stages(params, logical=False), tokens, self.cfg)
        return jnp.stack([jnp.bincount(experts[i].reshape(-1), length=self.cfg.moe.num_experts)
                          for i in self.moe_layers])

    def rebalance(self) -> dict:
        """EPLB on the load window: new placement; expert weights and Adam moments follow their experts."""
        from seekax.layers.eplb import rebalance

        load = self.window.sum(0).astype(np.float64)                                   # [MoE layers, E]
        before = self.placement.balance(load, self.tcfg.ep)
        new, plan = rebalance(load, self.placement, num_groups=self.cfg.moe.n_groups, num_nodes=1,
                              num_gpus=self.tcfg.ep)
        self.placement = new
        src = jnp.asarray(plan.src_slot)

        def migrate(path, leaf):
            where = self._where(path)
            if where is None:
                return leaf
            key = _key(path)
            if key in EXPERT_LEAVES:
                return jnp.take(leaf, src[where[1]], axis=0)
            if key in ("log2phy", "logcnt"):
                return jnp.asarray(self._tables(where[1])[key]) if leaf.ndim else leaf
            return leaf

        self.params = jax.device_put(jax.tree_util.tree_map_with_path(migrate, self.params), self._replicated)
        self.opt_state = jax.device_put(jax.tree_util.tree_map_with_path(migrate, self.opt_state), self._replicated)
        rec = {"step": self.step_count, "max_over_mean_before": before.tolist(),
               "max_over_mean_after": new.balance(load, self.tcfg.ep).tolist(),
               "slots_moved": int((plan.src_slot != np.arange(plan.src_slot.shape[1])).sum())}
        self.eplb_history.append(rec)
        return rec

    def _apply_fn(self, params, opt_state, grads, phy2log):
        grads = jax.tree.map(lambda g: jax.sharding.reshard(g, self._replicated), grads)
        if phy2log is not None:
            grads = self._sync_replicas(grads, phy2log)
        updates, opt_state = self.opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def _mtp_apply_fn(self, mtp, opt_state, grads):
        grads = jax.tree.map(lambda g: jax.sharding.reshard(g, self._replicated), grads)
        updates, opt_state = self.mtp_opt.update(grads, opt_state, mtp)
        return optax.apply_updates(mtp, updates), opt_state

    def loss_and_grads(self, tokens) -> tuple[jax.Array, list]:
        """tokens [M, b, S + 1] int32 -> (mean loss, per-stage grads). With MTP the loss is the next-token loss
        plus mtp_weight x the MTP modules' mean loss, and the MTP modules' grads are kept in `mtp_grads`."""
        tokens = jnp.asarray(tokens, jnp.int32)
        m, b = self.tcfg.microbatches, self.tcfg.microbatch_size
        if tokens.ndim != 3 or tokens.shape[:2] != (m, b) or tokens.shape[2] < 2:
            raise fail("tokens.shape", tuple(tokens.shape), f"[microbatches={m}, microbatch_size={b}, seq_len + 1]")
        out = self._full(self.params, self._loss_params(), tokens[..., :-1], tokens[..., 1:])
        if self.mtp is None:
            return out.loss, out.grads
        grads = list(out.grads)                                 # embedding and head are shared with the MTP modules
        grads[0] = {**grads[0], "embed": grads[0]["embed"] + out.loss_grads["embed"]}
        grads[-1] = {**grads[-1], "head": grads[-1]["head"] + out.loss_grads["head"]}
        self.mtp_grads = out.loss_grads["mtp"]
        return out.loss, grads

    def _loss_params(self):
        if self.mtp is None:
            return ()
        return {"embed": self.params[0]["embed"], "head": self.params[-1]["head"], "mtp": self.mtp}

    def lower(self, tokens):
        """The pipelined value-and-grad step lowered for tokens' shape (`jax.stages.Lowered`): its HLO shows the
        schedule's ticks and, with overlap, the F&B streams (`seekax.lowering.pipeline_hlo`)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return self._full.lower(self.params, self._loss_params(), tokens[..., :-1], tokens[..., 1:])

    def observe(self, tokens) -> np.ndarray:
        """Add the expert loads of a batch's inputs (tokens [M, b, S + 1]) to the EPLB window: tokens routed to
        each logical expert, [MoE layers, E], by the unpipelined model. Every process sees the whole batch (a
        batch spread over processes is gathered first), so all make the same rebalancing decision."""
        if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
            from jax.experimental import multihost_utils

            tokens = multihost_utils.process_allgather(tokens, tiled=True)
        t = np.asarray(tokens)[..., :-1]
        host = jax.device_get(self.params)       # the unpipelined model, outside the mesh's explicit axes
        load = np.asarray(self._loads(host, jnp.asarray(t.reshape(-1, t.shape[-1]))), np.float32)
        self.window[self.window_count % len(self.window)] = load
        self.window_count += 1
        return load

    def train_step(self, tokens) -> float:
        """One optimizer step on tokens [M, b, S + 1] (inputs and shifted targets): the loss before the step."""
        t0 = time.perf_counter()
        eplb = self.placement is not None and self.tcfg.eplb_every > 0
        if eplb and self.step_count % self.tcfg.stats_every == 0:
            self.observe(tokens)
        loss, grads = self.loss_and_grads(tokens)
        phy2log = None if self.placement is None else jnp.asarray(self.placement.phy2log, jnp.int32)
        self.params, self.opt_state = self._apply(self.params, self.opt_state, grads, phy2log)
        if self.mtp is not None:
            self.mtp, self.mtp_opt_state = self._mtp_apply(self.mtp, self.mtp_opt_state, self.mtp_grads)
        self.step_count += 1
        if eplb and self.step_count % self.tcfg.eplb_every == 0:
            self.rebalance()
        loss = float(loss)
        self.history.append({"step": self.step_count, "loss": loss, "seconds": time.perf_counter() - t0})
        return loss

    def peek_loss(self, tokens) -> float:
        """The loss the next `train_step` would report on tokens, changing no state."""
        return float(self.loss_and_grads(tokens)[0])

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _state(self) -> tuple[dict, Any]:
        """Everything the next step depends on, as (model, opt_state) trees for `TrainCheckpointer`: per-stage
        params (EPLB tables inside), the placement, the load window, the MTP modules and their optimizer state."""
        put = lambda x: jax.device_put(jnp.asarray(x), self._replicated)  # noqa: E731
        model = {"params": self.params, "window": put(self.window), "window_count": put(self.window_count),
                 "step": put(self.step_count)}
        if self.placement is not None:
            model["phy2log"] = put(np.asarray(self.placement.phy2log, np.int32))
        opt = {"stages": self.opt_state}
        if self.mtp is not None:
            model["mtp"], opt["mtp"] = self.mtp, self.mtp_opt_state
        return model, opt

    def save(self, ckpt, loader_state: dict | None = None):
        """Start an async save of this step into ckpt (a `TrainCheckpointer`) with the loader's position."""
        model, opt = self._state()
        return ckpt.save(self.step_count, model=model, opt_state=opt, loader_state=loader_state)

    def restore(self, ckpt, step: int | None = None) -> dict:
        """Replace params, optimizer state, EPLB placement and window with checkpoint `step`'s (latest when None);
        returns its loader state. The next step then computes what it would have computed after that save."""
        model_t, opt_t = self._state()
        model, opt, loader_state = ckpt.restore(step, model_target=model_t, opt_target=opt_t)
        self.params, self.opt_state = model["params"], opt["stages"]
        if self.mtp is not None:
            self.mtp, self.mtp_opt_state = model["mtp"], opt["mtp"]
        self.window = np.array(model["window"], np.float32)
        self.window_count, self.step_count = int(model["window_count"]), int(model["step"])
        if self.placement is not None:
            from seekax.ir.placement import ExpertPlacement

            self.placement = ExpertPlacement.from_phy2log(np.asarray(model["phy2log"]), self.cfg.moe.num_experts)
        return loader_state

    def model_params(self) -> dict:
        """The trained params in the model's layout (`seekax.models.deepseek`), as host arrays."""
        params = unwrap_fp8(merge_stages(jax.device_get(self.params), self.params_like))
        if self.mtp is not None:
            params["mtp"] = jax.device_get(self.mtp)
        return params


FP8_LEAVES = ("wq", "wq_a", "wq_b", "wkv_a", "wo", "w1", "w2", "w3", "shared_w1", "shared_w2", "shared_w3")


def fp8_projections(params: dict) -> dict:
    """Wrap the attention projections (all but the folded wkv_b), the dense MLPs' and the MoE layers' weights
    (routed and shared experts) in `Fp8Train`: trained through FP8 GEMMs (`fp8_linear`, the experts through
    `grouped_fp8_linear`), kept in float. Embedding, head, router and norms stay as they are."""
    from seekax.layers.linear import Fp8Train

    def wrap(path, leaf):
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] in FP8_LEAVES and ("attn" in keys or "mlp" in keys or "moe" in keys):
            return Fp8Train(w=leaf)
        return leaf

    return {**params, "layers": [jax.tree_util.tree_map_with_path(wrap, layer) for layer in params["layers"]]}


def unwrap_fp8(params: dict) -> dict:
    from seekax.layers.linear import Fp8Train

    return jax.tree.map(lambda x: x.w if isinstance(x, Fp8Train) else x, params,
                        is_leaf=lambda x: isinstance(x, Fp8Train))


def mtp_loss_fn(cfg: DeepseekConfig, weight: float, backend: str = "auto"):
    """loss(lp, (logits, h), targets): next-token loss + weight x mean over MTP depths of their losses.
    lp = {"embed", "head", "mtp"}; module k predicts token i+k+1 from h and the embedding of token i+k
    (= targets[:, i+k-1]); its experts run unsharded on this rank's tokens."""
    from seekax.models.deepseek import mtp_forward

    def fn(lp, y, targets):
        logits, h = y
        main = loss_fn(logits, targets)
        inputs = jnp.concatenate([targets[:, :1], targets[:, :-1]], axis=1)    # tokens 1.. (column 0 unused)
        outs = mtp_forward(lp, h, inputs, cfg, backend=backend)
        if not outs:
            return main
        extra = sum(loss_fn(o, targets[:, k:]) for k, o in enumerate(outs, start=1)) / len(outs)
        return main + weight * extra

    return fn


def _key(path):
    """The dict key naming the leaf (through an Fp8Train's `.w`), or the last attribute's name."""
    return leaf_key(path) or getattr(path[-1], "name", None)


def tokens_from_rows(rows: np.ndarray, tcfg: TrainConfig, vocab: int) -> np.ndarray:
    """A loader batch [M * b, S + 1] -> [M, b, S + 1]; ids must lie in [0, vocab)."""
    rows = np.asarray(rows)
    if rows.size and (rows.min() < 0 or rows.max() >= vocab):
        raise fail("data token ids", f"[{rows.min()}, {rows.max()}]", f"in [0, vocab={vocab}) (tokenize with the "
                   "model's tokenizer)")
    return rows.reshape(tcfg.microbatches, tcfg.microbatch_size, rows.shape[-1])
