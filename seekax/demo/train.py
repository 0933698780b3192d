"""Demo training: the tiny DeepSeek-V3 under a DualPipe(V) schedule over `pp` and expert parallelism over
`ep`, fed by the storage loader, with EPLB rebalancing from collected expert loads and async checkpoints.

Global batch layout (the same for 1 and for N processes, so their losses agree): rows of a global batch
are ordered by EP shard, then micro-batch, then row; process p reads the contiguous rows of the EP shards
its devices hold (`mesh_devices` puts each process's devices on a contiguous block of the `ep` axis).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.ir.placement import ExpertPlacement
from seekax.ir.validate import check_choice, check_int, fail
from seekax.models import tiny as M
from seekax.demo.data import to_model_vocab
from seekax.layers.eplb import LoadWindow, migrate_expert_weights, rebalance
from seekax.layers.pipeline import make_pipeline_train_step
from seekax.schedules.registry import make_schedule

EXPERT_LEAVES = ("w1", "w2", "w3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 200
    pp: int = 2
    ep: int = 4
    schedule: str = "dualpipev"
    microbatches: int = 4
    microbatch_size: int = 8          # sequences per micro-batch, split over ep
    lr: float = 3e-3
    warmup: int = 20
    stats_every: int = 5              # expert-load sample (one forward pass) every N steps
    eplb_every: int = 50              # EPLB rebalance + weight migration every N steps (0: never)
    eplb_window: int = 10             # load samples the window keeps
    ckpt_every: int = 50              # async checkpoint every N steps (0: never)
    seed: int = 0

    def __post_init__(self):
        check_choice("schedule", self.schedule, ("dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe", "interleaved"))
        for name in ("steps", "pp", "ep", "microbatches", "microbatch_size", "stats_every", "eplb_window"):
            check_int(name, getattr(self, name), min_value=1)
        for name in ("eplb_every", "ckpt_every", "warmup"):
            check_int(name, getattr(self, name), min_value=0)
        if self.microbatch_size % self.ep:
            raise fail("microbatch_size", self.microbatch_size, f"a multiple of ep={self.ep}")

    @property
    def global_batch(self) -> int:
        return self.microbatches * self.microbatch_size


def mesh_devices(pp: int, ep: int) -> np.ndarray:
    """[pp, ep] devices; each process's local devices fill a contiguous block of the ep axis (all pp rows),
    so a process holds whole EP shards of every micro-batch and reads only those rows."""
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    procs = jax.process_count()
    if pp * ep != len(devs) or ep % procs:
        raise fail("mesh", (pp, ep), f"pp * ep == {len(devs)} devices and ep a multiple of {procs} processes")
    per = ep // procs                                  # ep columns per process
    grid = np.empty((pp, ep), object)
    for p in range(procs):
        local = [d for d in devs if d.process_index == p]
        for i in range(pp):
            for j in range(per):
                grid[i, p * per + j] = local[i * per + j]
    return grid


def batch_to_microbatches(rows: np.ndarray, cfg: TrainConfig, num_processes: int) -> np.ndarray:
    """This process's rows [ep/P * M * b, S+1] (ordered ep shard, micro-batch, row) -> [M, ep/P * b, S+1]."""
    shards = cfg.ep // num_processes
    b = cfg.microbatch_size // cfg.ep
    r = rows.reshape(shards, cfg.microbatches, b, rows.shape[-1])
    return r.transpose(1, 0, 2, 3).reshape(cfg.microbatches, shards * b, rows.shape[-1])


class Trainer:
    """Owns mesh, params, optimizer state, placement, load window, loader and checkpointer."""

    def __init__(self, model_cfg: M.ModelConfig, cfg: TrainConfig, *, store_path: Path, run_dir: Path,
                 log=print):
        from seekax.storage.checkpoint import TrainCheckpointer
        from seekax.storage.loader import Loader, LoaderConfig

        self.mc, self.cfg, self.log = model_cfg, cfg, log
        self.run_dir = Path(run_dir)
        self.schedule = make_schedule(cfg.schedule, cfg.pp, cfg.microbatches)
        if self.schedule.num_stages != model_cfg.num_layers:
            raise fail("num_layers", model_cfg.num_layers,
                       f"the {cfg.schedule} schedule's {self.schedule.num_stages} stages on pp={cfg.pp}")
        if model_cfg.num_slots % cfg.ep:
            raise fail("num_slots", model_cfg.num_slots, f"a multiple of ep={cfg.ep}")
        self.mesh = jax.sharding.Mesh(mesh_devices(cfg.pp, cfg.ep), ("pp", "ep"),
                                      axis_types=(jax.sharding.AxisType.Explicit,) * 2)
        self.replicated = NamedSharding(self.mesh, P())
        self.nproc, self.pidx = jax.process_count(), jax.process_index()
        self.placement = M.initial_placement(model_cfg)
        params = M.init_params(jax.random.key(cfg.seed), model_cfg, self.placement)
        self.params = jax.device_put(params, self.replicated)
        sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
                                                   cfg.lr * 0.1)
        self.opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
        self.opt_state = jax.device_put(jax.jit(self.opt.init)(self.params), self.replicated)
        self.window = jax.device_put(LoadWindow.create(cfg.eplb_window, model_cfg.num_layers,
                                                       model_cfg.moe.num_experts), self.replicated)
        self.loader = Loader(store_path, LoaderConfig(global_batch_size=cfg.global_batch, seed=cfg.seed,
                                                      process_index=self.pidx, process_count=self.nproc))
        self.ckpt = TrainCheckpointer(self.run_dir / "ckpt", max_to_keep=2) if cfg.ckpt_every else None
        self.step = 0
        self.history: dict[str, list] = {"loss": [], "step_seconds": [], "eplb": [], "ckpt_blocking_ms": []}
        self._update = self._build_update()
        self._stats = self._build_stats()

    # ---- compiled functions ----------------------------------------------------------------------------
    def _build_update(self):
        mc = self.mc
        specs = M.param_specs(jax.tree.map(np.asarray, jax.eval_shape(lambda: self.params)), "ep")
        step = make_pipeline_train_step(self.schedule, M.make_stage_fn(mc, "ep"), M.loss_fn, mesh=self.mesh,
                                        param_specs=specs, batch_spec=P("ep"))
        num_experts = mc.moe.num_experts

        def sync_replicas(g, phy2log):
            # Replicas of one logical expert must stay identical: each gets the sum of all replicas' grads.
            g_log = jax.vmap(lambda a, p: jax.ops.segment_sum(a, p, num_segments=num_experts))(g, phy2log)
            return jax.vmap(lambda a, p: a[p])(g_log, phy2log)

        @jax.jit
        def update(params, opt_state, tokens, phy2log):
            x = M.tokens_to_stage_input(tokens[..., :-1], mc.hidden)               # [M, b, S, hidden]
            loss, grads = step(params, x, tokens[..., 1:].astype(jnp.int32))
            grads = jax.tree.map(lambda g: jax.sharding.reshard(g, self.replicated), grads)
            grads["moe"] = {k: (sync_replicas(v, phy2log) if k in EXPERT_LEAVES else v)
                            for k, v in grads["moe"].items()}
            updates, opt_state = self.opt.update(grads, opt_state, params)
            rep = lambda t: jax.tree.map(lambda a: jax.sharding.reshard(a, self.replicated), t)  # noqa: E731
            # Outputs as replicated as the inputs: the next call reuses this compiled program.
            return loss, rep(optax.apply_updates(params, updates)), rep(opt_state)

        return update

    def _build_stats(self):
        mc = self.mc
        specs = M.param_specs(jax.tree.map(np.asarray, jax.eval_shape(lambda: self.params)), "ep")
        in_specs = (jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda s: isinstance(s, P)), P(None, "ep"))

        def loads(params, tokens):                  # tokens [M, b_local, S]: this rank's rows
            t = tokens.reshape(-1, tokens.shape[-1])
            return M.forward(params, t, mc, ep_axis="ep")[1]                        # [L, E], psum'd over ep

        sharded = jax.shard_map(loads, mesh=self.mesh, in_specs=in_specs, out_specs=P())
        put = lambda x, s: jax.sharding.reshard(x, NamedSharding(self.mesh, s))  # noqa: E731
        return jax.jit(lambda params, tokens: sharded(jax.tree.map(put, params, in_specs[0]), tokens))

    # ---- data ----------------------------------------------------------------------------------------
    def next_batch(self) -> jax.Array:
        rows = to_model_vocab(next(self.loader), self.mc.vocab)
        local = batch_to_microbatches(rows, self.cfg, self.nproc)
        shape = (self.cfg.microbatches, self.cfg.microbatch_size, rows.shape[-1])
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(None, "ep")), local, shape)

    # ---- one step --------------------------------------------------------------------------------------
    def train_step(self, tokens: jax.Array | None = None) -> float:
        tokens = self.next_batch() if tokens is None else tokens
        t0 = time.perf_counter()
        if self.step % self.cfg.stats_every == 0:
            self.window = jax.device_put(self.window.add(self._stats(self.params, tokens[..., :-1])), self.replicated)
        phy2log = jnp.asarray(self.placement.phy2log, jnp.int32)
        loss, self.params, self.opt_state = self._update(self.params, self.opt_state, tokens, phy2log)
        loss = float(loss)
        self.step += 1
        self.history["loss"].append(loss)
        self.history["step_seconds"].append(time.perf_counter() - t0)
        if self.cfg.eplb_every and self.step % self.cfg.eplb_every == 0:
            self.rebalance()
        if self.ckpt and self.step % self.cfg.ckpt_every == 0:
            self.save()
        return loss

    def peek_loss(self, tokens: jax.Array) -> float:
        """The loss the next step would report on `tokens`, without changing any state."""
        phy2log = jnp.asarray(self.placement.phy2log, jnp.int32)
        return float(self._update(self.params, self.opt_state, tokens, phy2log)[0])

    # ---- EPLB ------------------------------------------------------------------------------------------
    def rebalance(self) -> dict[str, Any]:
        """EPLB on the load window: new placement, expert weights (and their Adam moments) migrated."""
        load = np.asarray(self.window.load(), np.float64)                       # [L, E]
        gpus = self.cfg.ep
        before = self.placement.balance(load, gpus)
        new, plan = rebalance(load, self.placement, num_groups=self.mc.moe.n_groups, num_nodes=1, num_gpus=gpus)
        if new.log2phy.shape[-1] > self.mc.maxcnt:
            raise fail("placement", new.log2phy.shape, f"at most maxcnt={self.mc.maxcnt} replicas per expert")
        after = new.balance(load, gpus)
        moved = int((plan.src_slot != np.arange(self.mc.num_slots)).sum())

        def migrate(path, leaf):
            names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            if len(names) >= 2 and names[-2] == "moe" and names[-1] in EXPERT_LEAVES:
                out = migrate_expert_weights(leaf, plan.src_slot, self.mesh, axis_name="ep")
                return jax.device_put(out, self.replicated)
            return leaf

        self.params = jax.tree_util.tree_map_with_path(migrate, self.params)
        self.opt_state = jax.tree_util.tree_map_with_path(migrate, self.opt_state)
        self.params.update(jax.device_put(M.placement_arrays(new, self.mc), self.replicated))
        self.placement = new
        rec = {"step": self.step, "before_max_over_mean": before.tolist(), "after_max_over_mean": after.tolist(),
               "slots_moved": moved, "load": load.tolist()}
        self.history["eplb"].append(rec)
        self.log(f"step {self.step}: EPLB max/mean GPU load {before.mean():.3f} -> {after.mean():.3f} "
                 f"(mean over layers), {moved} expert slots migrated")
        return rec

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self) -> None:
        # The load window is state too: the next rebalance depends on it, so a resume must restore it.
        res = self.ckpt.save(self.step, model={"params": self.params, "load_window": self.window},
                             opt_state=self.opt_state, loader_state=self.loader.get_state())
        self.history["ckpt_blocking_ms"].append(res.blocking_seconds * 1e3)

    def restore(self, step: int | None = None) -> int:
        """Replace params, optimizer state, placement and loader position with a checkpoint's."""
        model, opt_state, loader_state = self.ckpt.restore(
            step, model_target={"params": self.params, "load_window": self.window}, opt_target=self.opt_state)
        self.params, self.window, self.opt_state = model["params"], model["load_window"], opt_state
        params = self.params
        self.loader.set_state(loader_state)
        log2phy = np.asarray(params["log2phy"]).astype(np.int64)
        phy2log = np.zeros((self.mc.num_layers, self.mc.num_slots), np.int64)
        for layer, e, c in zip(*np.nonzero(log2phy >= 0)):
            phy2log[layer, log2phy[layer, e, c]] = e
        self.placement = ExpertPlacement.from_phy2log(phy2log, self.mc.moe.num_experts)
        self.step = int(loader_state["step"])
        return self.step

    def close(self) -> None:
        if self.ckpt:
            self.ckpt.wait()
            self.ckpt.close()

    def write_history(self, path: Path) -> None:
        path.write_text(json.dumps(self.history))
