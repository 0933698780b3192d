"""The dependency direction between seekax's layers (DESIGN.md), checked by scanning imports."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "seekax"
# layer -> layers it may import (besides itself). runtime and testing may import anything.
ALLOWED = {
    "ir": set(),
    "schedules": {"ir"},
    "lowering": {"ir", "testing"},
    "storage": {"ir"},
}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_allowed_layers(layer):
    bad = []
    for path in (ROOT / layer).rglob("*.py"):
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] == "seekax" and len(parts) > 1 and parts[1] != layer and parts[1] not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "layer dependency violations:\n" + "\n".join(bad)
