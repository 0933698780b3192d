"""`seekax eplb`: text and JSON output, file formats, clear failures."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from seekax.ir.placement import ExpertPlacement
from seekax.cli.main import main

with open(pathlib.Path(__file__).resolve().parents[1] / "data" / "eplb_cases.jsonl") as _f:
    README_CASE = json.loads(_f.readline())


def test_json_output_matches_reference_readme_case(tmp_path, capsys):
    path = tmp_path / "case.json"
    path.write_text(json.dumps(README_CASE))
    saved = tmp_path / "placement.json"
    argv = ["eplb", "--weights", str(path), "--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8",
            "--json", "--save", str(saved)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "hierarchical"
    assert out["placement"]["phy2log"] == README_CASE["phy2log_stable_sort"]
    np.testing.assert_allclose(out["balance_after"], README_CASE["max_over_mean_gpu_load_stable_sort"], rtol=1e-6)
    assert all(a <= b + 1e-9 for a, b in zip(out["balance_after"], out["balance_before"]))
    assert ExpertPlacement.from_json(saved.read_text()).phy2log.tolist() == README_CASE["phy2log_stable_sort"]


def test_text_output_from_npy(tmp_path, capsys, rng):
    path = tmp_path / "w.npy"
    np.save(path, rng.integers(0, 100, (2, 12)))
    argv = ["eplb", "--weights", str(path), "--replicas", "15", "--groups", "4", "--nodes", "5", "--gpus", "5"]
    assert main(argv) == 0  # 4 % 5 != 0: global policy
    text = capsys.readouterr().out
    assert "EPLB global" in text and text.count("layer ") == 2 and text.count("  gpu ") == 10
    assert "max/mean GPU load" in text


@pytest.mark.parametrize("extra, match", [
    (["--replicas", "14", "--gpus", "4"], "argument --replicas: expected a multiple of --gpus=4, got 14"),
    (["--replicas", "8", "--gpus", "4"], "argument --replicas: expected >= the number of logical experts (12)"),
    (["--replicas", "16", "--gpus", "4", "--nodes", "3"], "argument --gpus: expected a multiple of --nodes=3"),
    (["--replicas", "12", "--gpus", "4", "--groups", "5"], "argument --groups: expected a divisor"),
])
def test_bad_arguments_fail_clearly(tmp_path, capsys, extra, match):
    path = tmp_path / "w.json"
    path.write_text(json.dumps([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]))
    assert main(["eplb", "--weights", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seekax eplb: error: {match}") and err.count("\n") == 1  # one line, no traceback


def test_missing_or_wrong_file(tmp_path, capsys):
    assert main(["eplb", "--weights", str(tmp_path / "nope.npy"), "--replicas", "8", "--gpus", "4"]) == 2
    assert "argument --weights: expected an existing .npy or .json file" in capsys.readouterr().err
    (tmp_path / "w.txt").write_text("1 2 3")
    assert main(["eplb", "--weights", str(tmp_path / "w.txt"), "--replicas", "8", "--gpus", "4"]) == 2
    assert "argument --weights: expected a file ending in .npy or .json" in capsys.readouterr().err
    (tmp_path / "w.json").write_text("[[1, 2,")
    assert main(["eplb", "--weights", str(tmp_path / "w.json"), "--replicas", "8", "--gpus", "4"]) == 2
    err = capsys.readouterr().err
    assert "argument --weights: expected a readable .json file" in err and "Traceback" not in err


def test_module_entry_point(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.arange(1, 17, dtype=np.float32))
    run = subprocess.run([sys.executable, "-m", "seekax", "eplb", "--weights", str(path), "--replicas", "20",
                          "--groups", "4", "--nodes", "2", "--gpus", "4", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["num_replicas"] == 20


@pytest.mark.parametrize("name, content, match", [
    ("huge.npy", np.full((2, 12), 1e39), "argument --weights: expected loads summing to at most float32's max"),
    ("obj.json", {"loads": [1, 2, 3]}, "argument --weights: expected a JSON list of loads, or an object with the "
                                       "list at $.weight"),
    ("num.json", 5, "argument --weights: expected a JSON list of loads"),
])
def test_bad_load_files_fail_in_one_line(tmp_path, capsys, name, content, match):
    """Loads too large for float32, or JSON without loads: one line naming --weights, exit 2, no traceback."""
    path = tmp_path / name
    np.save(path, content) if name.endswith(".npy") else path.write_text(json.dumps(content))
    assert main(["eplb", "--weights", str(path), "--replicas", "16", "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seekax eplb: error: {match}") and err.count("\n") == 1, err


@pytest.mark.parametrize("weight", [np.arange(12), np.zeros((2, 12), np.int64), np.ones((3, 12), np.float16)])
def test_user_load_files_run(tmp_path, capsys, weight):
    """A single row [E], all-zero int64 and float16 loads: a placement, balance 1.0 where the load is zero."""
    path = tmp_path / "w.npy"
    np.save(path, weight)
    assert main(["eplb", "--weights", str(path), "--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_layers"] == (1 if weight.ndim == 1 else weight.shape[0]) and out["num_replicas"] == 16
    if not weight.any():
        assert out["balance_before"] == out["balance_after"] == [1.0, 1.0]
