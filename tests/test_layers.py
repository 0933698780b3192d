"""The dependency direction between seekax's packages (seekax/__init__.py), checked by scanning imports."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "seekax"
# package -> packages it may import (besides itself). Every package is listed; none is exempt.
ALLOWED = {
    "ir": set(),
    "testing": {"ir", "lowering"},
    "schedules": {"ir"},
    "storage": {"ir"},
    "lowering": {"ir"},
    "ops": {"ir", "lowering"},
    "layers": {"ir", "lowering", "ops", "schedules"},
    "models": {"ir", "lowering", "ops", "layers", "schedules", "storage"},
    "demo": {"ir", "lowering", "ops", "layers", "models", "schedules", "storage", "testing"},
    "cli": {"ir", "lowering", "ops", "layers", "models", "schedules", "storage", "testing", "demo"},
}
TOP_LEVEL = {"__init__.py", "__main__.py"}  # the root package: a docstring, the version, `python -m seekax`


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_every_package_has_a_rule():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), f"packages without a rule: {packages - set(ALLOWED)}; " \
                                     f"rules without a package: {set(ALLOWED) - packages}"
    stray = {p.name for p in ROOT.glob("*.py")} - TOP_LEVEL
    assert not stray, f"modules outside any package: {stray}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_allowed_packages(package):
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] == "seekax" and len(parts) > 1 and parts[1] != package and parts[1] not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "package dependency violations:\n" + "\n".join(bad)
