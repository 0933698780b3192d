#!/usr/bin/env bash
# One prepared run on a Hopper GPU machine (python3 with jax 0.11.2 + CUDA plugin already installed, no network):
# the kernel benchmarks first (each row checks the kernel's result against its baseline, so they double as
# hardware correctness checks at the real shapes), then the @pytest.mark.gpu suite, then the rest, all inside
# one time budget sized for a 15-minute device lease (one call, machine start included). A short table last.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu_out)
# Writes at most 6 files: env.txt, bench.log, pytest_gpu.log, pytest_gpu.xml, results.json, summary.txt.
# Environment:
#   SEEKAX_GPU_CHECK_BUDGET  seconds for the whole script (default 480; give `run` timeout_s >= this + 60)
#   SEEKAX_GPU_CHECK_ALL=1   also run the CPU-side benchmarks (eplb, schedules, storage) at the end
#   SEEKAX_GPU_CHECK_DRY=1   the same steps on a CPU (gpu tests skip, benchmarks --quick): tests this script
#   SEEKAX_GPU_PYTHON        interpreter (default python3)
set -uo pipefail
start=$SECONDS
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_out}}"
mkdir -p "$out"
cd "$root"
PY="${SEEKAX_GPU_PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dry="${SEEKAX_GPU_CHECK_DRY:-0}"
if [ "$dry" = 1 ]; then quick=--quick; else quick=; export SEEKAX_TEST_GPU=1; fi
budget="${SEEKAX_GPU_CHECK_BUDGET:-480}"
left() { echo $(( budget - (SECONDS - start) )); }
# at most `cap` seconds, never past the budget (minus `reserve` kept for later steps and the summary)
slot() { local cap=$1 reserve=$2 l; l=$(( $(left) - reserve )); [ "$l" -lt "$cap" ] && cap=$l; echo "$cap"; }

{
  date -u; "$PY" --version
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  "$PY" -c 'import grain' 2>/dev/null && echo "grain: yes" || echo "grain: missing (storage tests/benchmarks skipped)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

tmp="$(mktemp -d)"
: > "$out/bench.log"
bench() {  # bench NAME CAP RESERVE
  local name=$1 t
  t=$(slot "$2" "$3")
  if [ "$t" -lt 20 ]; then echo "-- $name skipped: budget spent" | tee -a "$out/bench.log"; return; fi
  echo "-- $name (limit ${t}s, $(( SECONDS - start ))s in)" | tee -a "$out/bench.log"
  timeout "$t" "$PY" "benchmarks/$name.py" $quick --json "$tmp/$name.json" >> "$out/bench.log" 2>&1
  echo "rc=$?" >> "$out/bench.log"
}

echo "== kernel benchmarks"
bench fp8_gemm 170 240
# dry run: the interpreter needs ~170 s for the four kernel front ends (bf16, FP8, sparse, sparse FP8)
bench mla_decode "$([ "$dry" = 1 ] && echo 200 || echo 110)" 170

echo "== pytest -m gpu ($(( SECONDS - start ))s in)"
# Only the files holding gpu tests: collecting the rest would import what the GPU image may lack (grain).
gpu_files=$(grep -rl "mark.gpu\|marks=pytest.mark.gpu" tests --include='test_*.py' | sort)
t=$(slot 200 70)
timeout "$t" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$out/pytest_gpu.xml" $gpu_files > "$out/pytest_gpu.log" 2>&1
pytest_rc=$?
[ "$pytest_rc" = 124 ] && echo "pytest stopped at its ${t}s limit" >> "$out/pytest_gpu.log"
tail -n 5 "$out/pytest_gpu.log"

echo "== other benchmarks"
bench matmul 60 15
bench ep_dispatch 60 10
bench deepseek_layer 90 5
if [ "${SEEKAX_GPU_CHECK_ALL:-0}" = 1 ]; then
  for name in eplb schedules storage; do bench "$name" 60 5; done
fi
"$PY" "$root/scripts/summarize_gpu_check.py" "$tmp" "$out/pytest_gpu.xml" "$out/results.json" | tee "$out/summary.txt"
echo "gpu_check: $(( SECONDS - start ))s of ${budget}s"
exit $pytest_rc
