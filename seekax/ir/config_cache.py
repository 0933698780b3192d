"""A JSON cache of autotuned tile configs keyed by spec + device + jax version (winners survive restarts)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

C = TypeVar("C")


def default_cache_path() -> Path:
    env = os.environ.get("SEEKAX_CONFIG_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seekax" / "tile_configs.json"


def cache_key(spec_key: str, device: str, jax_version: str) -> str:
    return f"{spec_key}|{device}|jax-{jax_version}"


class ConfigCache:
    """Maps cache_key -> config dict. Writes are atomic (temp file + rename); a corrupt file reads as empty."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, spec_key: str, device: str, jax_version: str) -> dict[str, Any] | None:
        entry = self._load().get(cache_key(spec_key, device, jax_version))
        return None if entry is None else entry["config"]

    def put(self, spec_key: str, device: str, jax_version: str, config: dict[str, Any],
            seconds: float | None = None) -> None:
        data = self._load()
        data[cache_key(spec_key, device, jax_version)] = {"config": config, "seconds": seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tile_configs.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def pick_config(explicit: C | None, *, spec_key: str | None, from_dict: Callable[[dict[str, Any]], C],
                heuristic: Callable[[], C], use_cache: bool) -> C:
    """Every op's one config priority: the explicit config, else the autotuned winner cached for this spec on
    this device and jax version (`use_cache`: only when the kernel runs on the device itself, never when
    interpreting or cross-lowering on a CPU), else `heuristic()`, which may raise NotImplementedError for a
    shape no config covers."""
    if explicit is not None:
        return explicit
    if use_cache and spec_key is not None:
        import jax

        from seekax.ir.device import detect_device

        device = detect_device()
        entry = None if device is None else ConfigCache().get(spec_key, device.name, jax.__version__)
        if entry is not None:
            return from_dict(entry)
    return heuristic()
