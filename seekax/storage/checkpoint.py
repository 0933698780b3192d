"""Training checkpoints: model state, optimizer state and loader state saved together by orbax, asynchronously.

One orbax `CheckpointManager` step holds three items: "model" and "opt" (array pytrees, written per shard by
tensorstore) and "loader" (the loader's JSON state, so data resumes where the weights do). orbax writes each step
under a temporary name and renames it when complete (its own atomicity), so a crash mid-save leaves the
previous step as the latest. `save` returns after the device-to-host copy; the writes finish in the background
(`wait()` joins them). `restore` takes target shardings, so a checkpoint saved on one mesh restores onto another.

Deletion is atomic too: retention renames an old step out of the step namespace (into `TRASH`, orbax's
`todelete_subdir`) and only then deletes its files, so a kill mid-deletion never leaves a listed step that cannot
be restored; leftovers are purged at the next join and when a checkpointer opens the directory.

Every committed step gets a per-file CRC-32 manifest (`checkpoint_crc.py`) and `restore` checks it first: a
flipped bit raises `CorruptCheckpointError`, never a wrong weight.

A failed background save (a full disk) is reported exactly once, by the next `wait()`, `save()` or `close()`, as
`StorageFullError` when space ran out; its partial files are removed, the steps before it are intact, and every
later call works. `restore()` never raises an earlier save's failure: it leaves it for those calls to report.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from seekax.ir.validate import check_int, fail
from seekax.storage.atomic import StorageFullError
from seekax.storage.checkpoint_crc import CorruptCheckpointError, verify, write_manifest

__all__ = ["CorruptCheckpointError", "SaveResult", "TrainCheckpointer"]

ITEMS = ("model", "opt", "loader")
TRASH = "deleted.seekax"  # not a step name: steps renamed here are invisible to all_steps() and restore()
_FULL_MARKERS = ("no space left", "file too large", "disk quota", "os_error_code='28'", "os_error_code='27'",
                 "os_error_code='122'")


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


def _check_loader_state(state: Any) -> None:
    """The loader item is JSON: refuse at the call what orbax would only fail on in its background thread."""
    if state is None:
        return
    if not isinstance(state, dict):
        raise fail("loader_state", type(state).__name__, "a dict (Loader.get_state()) or None")
    try:
        json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise fail("loader_state", repr(state)[:200], f"a JSON-serialisable dict of str/int/float/bool/None, "
                                                      f"lists and dicts ({e})") from None


def _is_full(e: BaseException) -> bool:
    """Out of space anywhere in the chain: an OSError's errno, or tensorstore's message inside orbax's error."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(m in str(e).lower() for m in _FULL_MARKERS):
            return True
        e = e.__cause__ or e.__context__
    return False


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
        self.directory = directory
        self._purge_trash()  # what a killed deletion left behind
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=check_int("save_interval_steps", save_interval_steps,
                                                                   min_value=1),
            enable_async_checkpointing=async_save, create=True, todelete_subdir=TRASH,
            cleanup_tmp_directories=True)
        # zstd (orbax's default) costs more CPU than it saves bytes on float weights; off unless asked for.
        arrays = lambda: ocp.PyTreeCheckpointHandler(use_compression=bool(compression))  # noqa: E731
        self._manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"model": arrays(), "opt": arrays(), "loader": ocp.JsonCheckpointHandler()})
        self._in_flight: int | None = None  # step whose background writes have not been joined
        self._failure: BaseException | None = None  # a background save's failure, not reported yet

    # -- the background save ------------------------------------------------------------------------------
    def _join(self) -> None:
        """Wait for the background writes; a failure is kept (once) for wait()/save()/close() to report."""
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises whatever its threads hit
            if step is not None:  # the failed step's partial files would hold the space the user frees
                for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            if _is_full(e):
                err = StorageFullError(errno.ENOSPC, f"checkpoint step {step} in {self.directory}: no space left "
                                                     f"({str(e).splitlines()[0][:300]}); the step was not "
                                                     "committed, earlier steps are intact; free space and save again")
                err.__cause__ = e
            else:
                err = e
            self._failure = err
            return
        if step is not None and jax.process_index() == 0 and (self.directory / str(step)).is_dir():
            try:
                write_manifest(self.directory / str(step))  # the step is committed: record what it holds
            except OSError as e:  # the step stays restorable, unchecked; said once like a failed save
                self._failure = e if isinstance(e, StorageFullError) else OSError(
                    e.errno, f"checkpoint step {step} is committed but its checksum manifest was not written ({e}); "
                             "it restores unchecked")

    def _report(self) -> None:
        err, self._failure = self._failure, None
        if err is not None:
            raise err

    def _purge_trash(self) -> None:
        trash = self.directory / TRASH
        if trash.exists():
            for p in trash.iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # -- API ------------------------------------------------------------------------------------------------
    def save(self, step: int, *, model: Any, opt_state: Any, loader_state: dict | None = None,
             force: bool = False) -> SaveResult:
        """Start saving `step`; returns once the arrays are copied off the devices (not written yet).

        If the previous save failed in the background, raises that failure (once) and starts nothing."""
        step = check_int("step", step)
        _check_tree("model", model)
        _check_tree("opt_state", opt_state)
        _check_loader_state(loader_state)
        args = ocp.args.Composite(model=ocp.args.PyTreeSave(model), opt=ocp.args.PyTreeSave(opt_state),
                                  loader=ocp.args.JsonSave(loader_state or {}))
        t0 = time.perf_counter()
        self._join()
        self._report()
        self._purge_trash()
        saved = self._manager.save(step, args=args, force=force)
        if saved:
            self._in_flight = step
        return SaveResult(saved=bool(saved), blocking_seconds=time.perf_counter() - t0)

    def wait(self) -> None:
        """Block until background writes are finished and the step is committed; raises a failed save's error
        (once: the next call is clean)."""
        self._join()
        self._purge_trash()
        self._report()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, step: int | None = None, *, model_target: Any, opt_target: Any) -> tuple[Any, Any, dict]:
        """(model, opt_state, loader_state) of `step` (latest when None), placed as the targets say.

        Targets: pytrees of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` or arrays whose sharding to use;
        a different mesh or partitioning than at save time is fine.
        """
        self._join()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise fail("directory", str(self.directory), "a directory holding at least one checkpoint")
        elif step not in self.all_steps():
            raise fail("step", step, f"one of the saved steps {self.all_steps()}")
        verify(self.directory / str(step), step)
        model_t, opt_t = _abstract(model_target), _abstract(opt_target)
        args = ocp.args.Composite(model=ocp.args.PyTreeRestore(model_t, restore_args=_restore_args(model_t)),
                                  opt=ocp.args.PyTreeRestore(opt_t, restore_args=_restore_args(opt_t)),
                                  loader=ocp.args.JsonRestore())
        out = self._manager.restore(step, args=args)
        return out["model"], out["opt"], dict(out["loader"] or {})

    def close(self) -> None:
        """Join the background writes and close; raises a failed save's error not reported yet."""
        self._join()
        self._manager.close()
        self._purge_trash()
        self._report()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # an exception is already on its way out: close without replacing it
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass
