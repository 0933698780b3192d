"""Every ```python block in README.md and docs/*.md runs as written, so the docs' examples cannot rot.

Each block runs in its own fresh interpreter (an example needing 8 host devices sets XLA_FLAGS itself), the
blocks of one document in order and in one scratch folder (a later block may read what an earlier one wrote).
`tests/` is linked into the folder, so examples name the repository's test data as a user's checkout would.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, dedented source) of each ```python block, indented ones (inside lists) too."""
    return [(text.count("\n", 0, m.start()) + 2, textwrap.dedent(m.group("body"))) for m in _BLOCK.finditer(text)]


def test_block_extraction_finds_indented_blocks_and_stops_at_their_fence():
    text = "x\n```python\na = 1\n```\n- item\n\n  ```python\n  b = 2\n  ```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (8, "b = 2\n")]


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d.read_text())], ids=lambda d: d.name)
def test_doc_examples_run(doc: Path, tmp_path: Path):
    (tmp_path / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for line, source in python_blocks(doc.read_text()):
        script = tmp_path / f"{doc.stem}_line{line}.py"
        script.write_text(source)
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{doc.relative_to(ROOT)}:{line} failed:\n{run.stderr[-3000:]}"
