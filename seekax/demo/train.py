"""Demo training: the tiny DeepSeek-V3 through `seekax.models.train.Trainer` (its layers as heterogeneous
pipeline stages under DualPipeV over `pp`, MoE stages as sub-steps whose all-to-alls overlap the other F&B
stream, experts over `ep`, EPLB replicas rebalanced from sampled loads), fed by the storage loader, with
async orbax checkpoints that resume bit for bit.

Global batch layout (the same for 1 and for N processes, so their losses agree): rows of a global batch
are ordered by EP shard, then micro-batch, then row; process p reads the contiguous rows of the EP shards
its devices hold (`mesh_devices` puts each process's devices on a contiguous block of the `ep` axis).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seekax.ir.validate import fail
from seekax.models.train import Trainer, TrainConfig


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


class DemoTrainer:
    """The model's `Trainer` plus what a run needs around it: the loader (this process's rows of each global
    batch), the checkpointer (params, Adam state, EPLB placement and load window, loader position) and the
    loss, timing, EPLB and checkpoint history the report draws."""

    def __init__(self, params: dict, cfg, tcfg: TrainConfig, *, store_path: Path, run_dir: Path,
                 tokenizer: Path, log=print):
        from seekax.storage.checkpoint import TrainCheckpointer
        from seekax.storage.loader import Loader, LoaderConfig

        self.tcfg, self.log = tcfg, log
        self.trainer = Trainer(params, cfg, tcfg, devices=mesh_devices(tcfg.pp, tcfg.ep))
        self.mesh = self.trainer.mesh
        self.nproc, self.pidx = jax.process_count(), jax.process_index()
        self.loader = Loader(store_path, LoaderConfig(global_batch_size=tcfg.microbatches * tcfg.microbatch_size,
                                                      seed=tcfg.seed, process_index=self.pidx,
                                                      process_count=self.nproc), tokenizer=str(tokenizer))
        self.ckpt = TrainCheckpointer(Path(run_dir) / "ckpt", max_to_keep=2) if tcfg.ckpt_every else None
        self.ckpt_blocking_ms: list[float] = []

    @property
    def step(self) -> int:
        return self.trainer.step_count

    @property
    def history(self) -> dict[str, list]:
        """Per step the loss and seconds, the EPLB rebalances and the checkpoints' blocking times (what the
        report draws), from the `Trainer`'s own records."""
        steps = self.trainer.history
        return {"loss": [h["loss"] for h in steps], "step_seconds": [h["seconds"] for h in steps],
                "eplb": list(self.trainer.eplb_history), "ckpt_blocking_ms": list(self.ckpt_blocking_ms)}

    def next_batch(self) -> jax.Array:
        """The next global batch [M, b, S + 1], this process's rows read from the store."""
        rows = next(self.loader)
        local = batch_to_microbatches(rows, self.tcfg, self.nproc)
        shape = (self.tcfg.microbatches, self.tcfg.microbatch_size, rows.shape[-1])
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(None, "ep")), local, shape)

    def train_step(self) -> float:
        rebalances = len(self.trainer.eplb_history)
        loss = self.trainer.train_step(self.next_batch())
        if len(self.trainer.eplb_history) > rebalances:
            rec = self.trainer.eplb_history[-1]
            before, after = np.mean(rec["max_over_mean_before"]), np.mean(rec["max_over_mean_after"])
            self.log(f"step {self.step}: EPLB max/mean GPU load {before:.3f} -> {after:.3f} (mean over MoE "
                     f"layers), {rec['slots_moved']} expert slots migrated")
        if self.ckpt and self.step % self.tcfg.ckpt_every == 0:
            res = self.trainer.save(self.ckpt, self.loader.get_state())
            self.ckpt_blocking_ms.append(res.blocking_seconds * 1e3)
        return loss

    def peek_loss(self, tokens: jax.Array) -> float:
        return self.trainer.peek_loss(tokens)

    def restore(self, step: int | None = None) -> int:
        """Params, optimizer state, placement, load window and loader position from a checkpoint."""
        self.loader.set_state(self.trainer.restore(self.ckpt, step))
        return self.step

    def close(self) -> None:
        if self.ckpt:
            self.ckpt.wait()
            self.ckpt.close()

    def write_history(self, path: Path) -> None:
        path.write_text(json.dumps(self.history))
