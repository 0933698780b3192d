"""ruff (configured in pyproject.toml) runs clean over the whole repository."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    try:
        import ruff  # noqa: F401 - the dev extra installs it into the venv
        return [sys.executable, "-m", "ruff"]
    except ImportError:
        exe = shutil.which("ruff")
        return [exe] if exe else None


def test_ruff_clean():
    cmd = _ruff()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed: CI installs the [dev] extra, which must include it")
        pytest.skip("ruff not installed (pip install -e '.[dev]')")
    result = subprocess.run([*cmd, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_modules_have_unique_basenames():
    """pytest imports test files by basename (no __init__.py in tests/): two with one name break collection."""
    seen: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("*.py"):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    dupes = {name: paths for name, paths in seen.items() if len(paths) > 1 and name != "__init__.py"}
    assert not dupes, f"test modules sharing a basename: {dupes}"
