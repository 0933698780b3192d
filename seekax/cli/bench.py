"""`seekax bench [NAME ...] [--quick]`: run the repository's benchmarks/*.py (each prints a table)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem != "common")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks from the repository's benchmarks/ folder", description=__doc__)
    p.add_argument("names", nargs="*",
                   help=f"benchmarks to run (default: all): {', '.join(available()) or 'none found'}")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a dry run that finishes quickly on a CPU")
    p.add_argument("--json-dir", default=None, help="write NAME.json result files here")
    p.set_defaults(func=run)


def run(args) -> int:
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"seekax bench: names={unknown}: expected some of {available()} (benchmarks/ in a source checkout)",
              file=sys.stderr)
        return 2
    rc = 0
    for name in names:
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py")] + (["--quick"] if args.quick else [])
        if args.json_dir:
            Path(args.json_dir).mkdir(parents=True, exist_ok=True)
            cmd += ["--json", str(Path(args.json_dir) / f"{name}.json")]
        print(f"== {name}", flush=True)
        rc |= subprocess.call(cmd)
    return rc
