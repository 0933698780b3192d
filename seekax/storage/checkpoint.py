"""Training checkpoints: model state, optimizer state and loader state saved together by orbax, asynchronously.

One orbax `CheckpointManager` step holds three items: "model" and "opt" (array pytrees, written per shard by
tensorstore) and "loader" (the loader's JSON state, so data resumes where the weights do). orbax writes each step
under a temporary name and renames it when complete (its own atomicity), so a crash mid-save leaves the
previous step as the latest. `save` returns after the device-to-host copy; the writes finish in the background
(`wait()` joins them). `restore` takes target shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from seekax.ir.validate import check_int, fail

ITEMS = ("model", "opt", "loader")


@dataclass(frozen=True, kw_only=True)
class SaveResult:
    saved: bool  # False when the step was skipped by save_interval_steps
    blocking_seconds: float  # time the caller was blocked (device->host copy + scheduling)


def _abstract(tree: Any) -> Any:
    """Arrays / ShapeDtypeStructs -> ShapeDtypeStructs carrying their sharding (the restore target)."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        raise fail("target leaf", type(x).__name__, "a jax.Array or jax.ShapeDtypeStruct with a sharding")
    return jax.tree.map(one, tree)


def _check_tree(name: str, tree: Any) -> None:
    """Validate before orbax starts: it fails late (in background threads) on empty or odd trees."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise fail(name, tree, "a non-empty pytree of arrays")
    for leaf in leaves:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float)):
            raise fail(f"{name} leaf", type(leaf).__name__, "a jax.Array, numpy array or scalar")


def _restore_args(abstract: Any) -> Any:
    return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
                        abstract)


class TrainCheckpointer:
    """`TrainCheckpointer(directory, max_to_keep=3, save_interval_steps=1, async_save=True, compression=False)`."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True, compression: bool = False):
        directory = Path(directory).absolute()
        if directory.exists() and not directory.is_dir():
            raise fail("directory", str(directory), "a checkpoint directory (it is an existing file)")
        if max_to_keep is not None:
            check_int("max_to_keep", max_to_keep, min_value=1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=check_int("save_interval_steps", save_interval_steps,
                                                                   min_value=1),
            enable_async_checkpointing=async_save, create=True)
        self.directory = directory
        # zstd (orbax's default) costs more CPU than it saves bytes on float weights; off unless asked for.
        arrays = lambda: ocp.PyTreeCheckpointHandler(use_compression=bool(compression))  # noqa: E731
        self._manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"model": arrays(), "opt": arrays(), "loader": ocp.JsonCheckpointHandler()})

    def save(self, step: int, *, model: Any, opt_state: Any, loader_state: dict | None = None,
             force: bool = False) -> SaveResult:
        """Start saving `step`; returns once the arrays are copied off the devices (not written yet)."""
        step = check_int("step", step)
        _check_tree("model", model)
        _check_tree("opt_state", opt_state)
        if loader_state is not None and not isinstance(loader_state, dict):
            raise fail("loader_state", type(loader_state).__name__, "a dict (Loader.get_state()) or None")
        args = ocp.args.Composite(model=ocp.args.PyTreeSave(model), opt=ocp.args.PyTreeSave(opt_state),
                                  loader=ocp.args.JsonSave(loader_state or {}))
        t0 = time.perf_counter()
        saved = self._manager.save(step, args=args, force=force)
        return SaveResult(saved=bool(saved), blocking_seconds=time.perf_counter() - t0)

    def wait(self) -> None:
        """Block until background writes are finished and the step is committed."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, step: int | None = None, *, model_target: Any, opt_target: Any) -> tuple[Any, Any, dict]:
        """(model, opt_state, loader_state) of `step` (latest when None), placed as the targets say.

        Targets: pytrees of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` or arrays whose sharding to use;
        a different mesh or partitioning than at save time is fine.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise fail("directory", str(self.directory), "a directory holding at least one checkpoint")
        elif step not in self.all_steps():
            raise fail("step", step, f"one of the saved steps {self.all_steps()}")
        model_t, opt_t = _abstract(model_target), _abstract(opt_target)
        args = ocp.args.Composite(model=ocp.args.PyTreeRestore(model_t, restore_args=_restore_args(model_t)),
                                  opt=ocp.args.PyTreeRestore(opt_t, restore_args=_restore_args(opt_t)),
                                  loader=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        return out["model"], out["opt"], dict(out["loader"] or {})

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
