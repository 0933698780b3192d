"""seekax.storage depends only on seekax.ir and its libraries (DESIGN.md: storage -> ir)."""

import ast
from pathlib import Path

import seekax.storage

ALLOWED_SEEKAX = ("seekax.ir", "seekax.storage")


def test_storage_imports_only_ir():
    bad = []
    for path in Path(seekax.storage.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names
                    if n.startswith("seekax") and not n.startswith(ALLOWED_SEEKAX)]
    assert not bad, bad
