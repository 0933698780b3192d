"""The end-to-end demo, shortened: writes a tiny DeepSeek-V3 as a Hugging Face directory, trains it under
DualPipeV with overlapped MoE sub-steps (loss falls), saves and reloads it, serves it through `seekax
generate`'s code path (greedy decode equals the full forward, the second round reuses the KV store's pages),
survives a SIGKILL (the resumed run reproduces the uninterrupted run's losses exactly), and runs as two JAX
processes on loopback with the same losses as one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--seq-len", "16", "--microbatch-size", "4", "--docs", "600", "--gen", "4", "--eplb-every", "3",
         "--ckpt-every", "3", "--lr", "0.01"]
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the demo gives itself its host devices
    return env


def _demo(*args, timeout=600, **kw):
    cmd = [sys.executable, "-m", "seekax", "demo", *SMALL, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)


def _losses(workdir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run re-records replayed steps)."""
    out = {}
    for line in (workdir / "run" / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    res = _demo("--steps", 8, "--workdir", d / "w", "--report", d / "r")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return d, res.stdout


def test_demo_trains_serves_and_reports(full_run):
    d, stdout = full_run
    losses = _losses(d / "w")
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.5, losses  # the loss falls
    summary = json.loads((d / "r" / "summary.json").read_text())
    assert summary["stages"] == [[0, 1], [1, 2], [2, 3], [3, 4]]      # one layer a stage: embed+dense ... MoE+head
    assert summary["decode_equals_full_forward"] is True
    assert summary["resume_next_loss_identical"] is True
    # 8 requests whose prompts share their first 64-token page: the second round takes each from the KV store
    assert summary["prompt_tokens_reused_miss_then_hit"] == [0, 8 * 64] and summary["kv_page_hit_rate"] == 0.5
    assert summary["eplb_rebalances"] == 2
    assert summary["eplb_max_over_mean_after"] <= summary["eplb_max_over_mean_before"]
    for name in ("loss_curve.png", "schedule.png", "eplb_balance.png", "summary.txt"):
        assert (d / "r" / name).stat().st_size > 0, name
    assert "seekax demo summary" in stdout
    from seekax.models.deepseek_config import load_config

    cfg = load_config(d / "w" / "model")                               # the trained model, a servable directory
    assert cfg.num_layers == 4 and (d / "w" / "model" / "tokenizer.json").is_file()


def test_kill_and_resume_reproduces_the_uninterrupted_losses(full_run, tmp_path):
    d, _ = full_run
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "seekax", "demo", *SMALL, "--steps", "8", "--no-serve", "--workdir", str(work),
           "--report", str(tmp_path / "r")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = work / "run" / "losses.jsonl"
    deadline = time.time() + 600
    try:
        # Kill once step 6 is logged: the step-3 checkpoint has had three steps to commit.
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and any(json.loads(x)["step"] >= 6 for x in log.read_text().splitlines()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(_losses(work))
    assert killed_at < 8
    res = _demo("--steps", 8, "--no-serve", "--resume", "--workdir", work, "--report", tmp_path / "r")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from checkpoint step" in res.stdout
    assert _losses(work) == _losses(d / "w")  # bit-identical, every step


def test_two_processes_on_loopback_match_one_process(full_run, tmp_path):
    d, _ = full_run
    res = _demo("--steps", 4, "--no-serve", "--processes", 2, "--workdir", tmp_path / "w", "--report", tmp_path / "r")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two, one = _losses(tmp_path / "w"), _losses(d / "w")
    assert sorted(two) == [1, 2, 3, 4]
    for step, loss in two.items():
        assert abs(loss - one[step]) <= 1e-4 * abs(one[step]), (step, loss, one[step])
