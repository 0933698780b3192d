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
log="$venv/.seekax-pip.log"
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/constraints.txt" -e "$root[data,dev]" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2 || true
  echo "seekax: pip install failed (log: $log)" >&2; exit 1
fi
echo "$want" > "$stamp"
echo "$venv/bin/python"
