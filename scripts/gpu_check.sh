#!/usr/bin/env bash
# One prepared run on a Hopper GPU machine (python3 with jax 0.11.2 + CUDA plugin already installed,
# no network): the @pytest.mark.gpu suite, then every benchmark, then a short table.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu_out)
# Writes at most 6 files: env.txt, pytest_gpu.log, pytest_gpu.xml, bench.log, results.json, summary.txt.
# SEEKAX_GPU_CHECK_DRY=1 runs the same steps on a CPU (gpu tests skip, benchmarks --quick) to test the script.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_out}}"
mkdir -p "$out"
cd "$root"
PY="${SEEKAX_GPU_PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dry="${SEEKAX_GPU_CHECK_DRY:-0}"
if [ "$dry" = 1 ]; then quick=--quick; else quick=; export SEEKAX_TEST_GPU=1; fi
budget="${SEEKAX_BENCH_TIMEOUT:-120}"   # seconds per benchmark

{
  date -u; "$PY" --version
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 || true
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== pytest -m gpu"
timeout "${SEEKAX_PYTEST_TIMEOUT:-300}" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider \
  --junitxml="$out/pytest_gpu.xml" tests > "$out/pytest_gpu.log" 2>&1
pytest_rc=$?
tail -n 5 "$out/pytest_gpu.log"

echo "== benchmarks"
: > "$out/bench.log"
tmp="$(mktemp -d)"
for b in benchmarks/*.py; do
  name="$(basename "$b" .py)"
  [ "$name" = common ] && continue
  echo "-- $name" | tee -a "$out/bench.log"
  timeout "$budget" "$PY" "$b" $quick --json "$tmp/$name.json" >> "$out/bench.log" 2>&1
  echo "rc=$?" >> "$out/bench.log"
done
"$PY" "$root/scripts/summarize_gpu_check.py" "$tmp" "$out/pytest_gpu.xml" "$out/results.json" | tee "$out/summary.txt"
exit $pytest_rc
