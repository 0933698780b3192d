#!/usr/bin/env bash
# Create (or reuse) .venv with a Python >= 3.12 and the pinned dependencies.
# Prints the venv's python path on stdout; everything else goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

find_python() {
  local c
  for c in "${SEEKAX_PYTHON:-}" python3.13 python3.12 python3 python \
           "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/bin/python3.1[2-9] /usr/local/bin/python3.1[2-9]; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    # pyenv shims fail unless a version is selected; a failing candidate is skipped.
    if "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      echo "$c"; return 0
    fi
  done
  return 1
}

stamp="$venv/.seekax-stamp"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv/bin/python"; exit 0
fi
py="$(find_python)" || { echo "seekax: no Python >= 3.12 found (tried python3.13, python3.12, python3, pyenv versions); set SEEKAX_PYTHON" >&2; exit 1; }
echo "seekax: creating $venv with $py ($("$py" --version 2>&1))" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv" >&2
# Extras: [data] (storage, demo) and [dev] (tests, lint) always; [gpu] (jax's CUDA 13 plugin) when an NVIDIA GPU
# answers nvidia-smi, or when SEEKAX_EXTRAS says so (e.g. SEEKAX_EXTRAS=data,dev,gpu).
extras="${SEEKAX_EXTRAS:-data,dev}"
if [ -z "${SEEKAX_EXTRAS:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="$extras,gpu"
  echo "seekax: NVIDIA GPU found ($(nvidia-smi -L | head -n 1)); installing the [gpu] extra too" >&2
fi
log="$venv/.seekax-pip.log"
echo "seekax: pip install -e '.[$extras]' with constraints.txt (a first install takes a few minutes; log: $log)" >&2
# pip's own lines, shortened to what it is doing now, so a long install is not minutes of silence.
set +o pipefail
"$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -c "$root/constraints.txt" \
    -e "$root[$extras]" 2>&1 | tee "$log" \
  | grep --line-buffered -E "^(Collecting|Installing collected|Successfully installed|ERROR)" \
  | sed -u -e 's/^/seekax: pip: /' -e 's/^\(.\{160\}\).*/\1 .../' >&2
status=${PIPESTATUS[0]}
set -o pipefail
if [ "$status" != 0 ]; then
  grep -v "^WARNING: Location" "$log" | tail -n 30 >&2 || true
  echo "seekax: pip install failed (exit $status; full log: $log)" >&2; exit 1
fi
echo "seekax: environment ready ($venv)" >&2
echo "$want" > "$stamp"
echo "$venv/bin/python"
