#!/usr/bin/env bash
# Run the test suite from a fresh clone: sets up .venv on first use. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
exec "$py" -m pytest "$@"
