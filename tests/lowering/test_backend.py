"""`run_op`, the one backend choice: its semantics on fake kernels, and a source scan that finds no fallback
(no caught NotImplementedError, no backend rewritten to "xla", no private backend resolution) anywhere else."""

from __future__ import annotations

import ast
import pathlib

import pytest

from seekax.lowering import backend

ROOT = pathlib.Path(__file__).resolve().parents[2] / "seekax"
BACKEND_FILE = ROOT / "lowering" / "backend.py"
# The command line turns an op's ValueError/NotImplementedError into a usage message and a non-zero exit;
# it never runs another backend.
ERROR_REPORTERS = {ROOT / "cli" / "main.py"}


class Calls:
    """A fake op: a kernel that takes or declines, a reference, and the record of what ran."""

    def __init__(self, declines: Exception | None = None):
        self.ran: list[str] = []
        self.declines = declines

    def kernel(self, resolved: str) -> str:
        self.ran.append(resolved)
        if self.declines is not None:
            raise self.declines
        return "kernel"

    def reference(self) -> str:
        self.ran.append("xla")
        return "reference"

    def run(self, requested: str):
        return backend.run_op(requested, kernel=self.kernel, reference=self.reference, name="fake")


@pytest.mark.parametrize("hopper", [False, True])
def test_explicit_backends_run_what_they_name(monkeypatch, hopper):
    monkeypatch.setattr(backend, "is_hopper", lambda: hopper)
    for requested in ("mosaic", "interpret"):
        calls = Calls()
        assert calls.run(requested) == "kernel" and calls.ran == [requested]
    calls = Calls()
    assert calls.run("xla") == "reference" and calls.ran == ["xla"]


@pytest.mark.parametrize("requested", ["mosaic", "interpret"])
def test_a_kernel_asked_for_by_name_lets_its_refusal_through(monkeypatch, requested):
    monkeypatch.setattr(backend, "is_hopper", lambda: True)
    calls = Calls(declines=NotImplementedError("n=40: no tile divides N"))
    with pytest.raises(NotImplementedError, match="n=40"):
        calls.run(requested)
    assert calls.ran == [requested]


def test_auto_on_hopper_tries_the_kernel_then_the_reference(monkeypatch, caplog):
    monkeypatch.setattr(backend, "is_hopper", lambda: True)
    calls = Calls()
    assert calls.run("auto") == "kernel" and calls.ran == ["mosaic"]
    calls = Calls(declines=NotImplementedError("m=100: not a tile multiple"))
    with caplog.at_level("DEBUG", logger=backend.__name__):
        assert calls.run("auto") == "reference"
    assert calls.ran == ["mosaic", "xla"]
    assert "fake: the kernel declined (m=100: not a tile multiple)" in caplog.text


def test_auto_elsewhere_runs_the_reference_without_the_kernel(monkeypatch):
    monkeypatch.setattr(backend, "is_hopper", lambda: False)
    calls = Calls()
    assert calls.run("auto") == "reference" and calls.ran == ["xla"]


@pytest.mark.parametrize("error", [ValueError("config overflows"), RuntimeError("lowering failed")])
def test_auto_never_hides_other_errors(monkeypatch, error):
    """Only "not for this shape" falls back; a kernel bug or a bad config surfaces."""
    monkeypatch.setattr(backend, "is_hopper", lambda: True)
    calls = Calls(declines=error)
    with pytest.raises(type(error), match=str(error)):
        calls.run("auto")
    assert calls.ran == ["mosaic"]


def test_unknown_backend_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="^backend='cuda': expected one of"):
        Calls().run("cuda")
    with pytest.raises(ValueError, match="^backend='gpu'"):
        backend.check_backend("gpu")


def test_kernel_takes():
    from seekax.ir.tiling import SharedMemoryBudgetExceeded

    def raising(error):
        def build():
            raise error
        return build

    assert backend.kernel_takes(lambda: "built")
    assert not backend.kernel_takes(raising(NotImplementedError("k=100")))
    assert not backend.kernel_takes(raising(SharedMemoryBudgetExceeded(300_000)))
    with pytest.raises(ValueError, match="block_n"):
        backend.kernel_takes(raising(ValueError("block_n=7")))


# ------------------------------------------------------------------------------------------- the source scan
def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _names(node) -> set[str]:
    """Exception class names an `except` clause catches (`except A`, `except (A, B)`, `except m.A`)."""
    if node is None:
        return set()
    parts = node.elts if isinstance(node, ast.Tuple) else [node]
    return {p.attr if isinstance(p, ast.Attribute) else getattr(p, "id", "?") for p in parts}


def _fallbacks(tree: ast.AST, *, may_catch: bool = False) -> list[tuple[int, str]]:
    """(line, what) for each piece of fallback logic in one module: an `except` that catches
    NotImplementedError, a call to resolve_backend, an assignment of "xla" to `backend`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and not may_catch:
            caught = _names(node.type)
            if "NotImplementedError" in caught:
                found.append((node.lineno, f"catches {sorted(caught)}"))
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn == "resolve_backend":
                found.append((node.lineno, "resolves a backend itself"))
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if (any(getattr(t, "id", None) == "backend" for t in targets)
                    and isinstance(node.value, ast.Constant) and node.value.value == "xla"):
                found.append((node.lineno, "rewrites the backend to xla"))
    return found


def test_no_fallback_outside_run_op():
    """Grepping the package for fallback code finds only `lowering/backend.py`."""
    found = [f"{path.relative_to(ROOT.parent)}:{line} {what}"
             for path, tree in _sources() if path != BACKEND_FILE
             for line, what in _fallbacks(tree, may_catch=path in ERROR_REPORTERS)]
    assert not found, "fallback logic outside seekax/lowering/backend.py:\n" + "\n".join(found)


@pytest.mark.parametrize("code", [
    "try:\n    f()\nexcept NotImplementedError:\n    g()\n",
    "try:\n    f()\nexcept (ValueError, NotImplementedError) as e:\n    g()\n",
    "try:\n    f()\nexcept errors.NotImplementedError:\n    g()\n",
    "backend = resolve_backend(backend)\n",
    "b = backend_mod.resolve_backend('auto')\n",
    "if x:\n    backend = 'xla'\n",
])
def test_the_scan_finds_each_kind_of_fallback(code):
    assert _fallbacks(ast.parse(code))


def test_the_scan_passes_run_op_callers():
    code = "def op(x, backend='auto'):\n    return run_op(backend, kernel=k, reference=lambda: r(x, backend='xla'))\n"
    assert not _fallbacks(ast.parse(code))
