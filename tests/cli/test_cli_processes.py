"""`python -m seekax` as a process: quiet when its reader stops early (`| head -1`), exit 2 with one line for a
usage error, and `seekax bench` from a copy of the package without the repository around it."""

import os
import pathlib
import shutil
import subprocess
import sys

import seekax

SEEKAX = [sys.executable, "-m", "seekax"]


def test_piping_into_head_is_quiet():
    # ~240 KB of terminal view: far more than a pipe holds, so the writer meets the closed pipe.
    proc = subprocess.Popen([*SEEKAX, "schedule", "show", "1f1b", "--ranks", "64", "--microbatches", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after one line
    rc = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert first.startswith(b"rank  0 0F0|0F1|")
    assert rc == 0 and err == ""


def test_usage_error_exit_status_and_one_line():
    run = subprocess.run([*SEEKAX, "lower", "fp8_gemm", "--k", "200", "--emit", "jaxpr"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    # one line: the flag, the value, then the kernel's own words for what it supports
    assert run.stderr.startswith("seekax lower: error: argument --k: 200 is not supported: ")
    assert run.stderr.count("\n") == 1 and "multiple of 32" in run.stderr


def test_bench_from_a_package_outside_the_repository(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(pathlib.Path(seekax.__file__).parent, site / "seekax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([*SEEKAX, "bench", "--quick"], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (f"seekax bench: error: no benchmarks at {site / 'benchmarks'}: they live in the seekax "
                          "repository's benchmarks/ folder, not in the installed package; run `seekax bench` from a "
                          "source checkout (pip install -e .)\n")
