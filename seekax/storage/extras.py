"""Optional dependencies: the `[data]` extra (grain, DuckDB, pyarrow, tokenizers) is checked where it is first
needed, so a missing one is named with the command that installs it instead of a ModuleNotFoundError from deep
inside a worker."""

from __future__ import annotations

import importlib

DATA_EXTRA = ("grain", "duckdb", "pyarrow")
INSTALL = "pip install 'seekax[data]'"


class MissingExtraError(ImportError):
    """An optional dependency group (a pip extra) is not installed; the message names the command that
    installs it. The CLI prints it as one line."""


def require_data_extra(*modules: str, feature: str = "this feature") -> None:
    """Raise ImportError naming the `[data]` extra if any of `modules` (default: grain, duckdb, pyarrow) is
    missing. `feature` says what needs them, e.g. "seekax demo"."""
    missing = []
    for name in modules or DATA_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"{feature} needs the [data] extra, which is not installed (missing: "
                          f"{', '.join(missing)}); install it with: {INSTALL}", name=missing[0])
