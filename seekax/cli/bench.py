"""`seekax bench [NAME ...] [--quick]`: run the repository's benchmarks/*.py (each prints a table).

The benchmarks live in the source repository beside the package (`benchmarks/`), not in an installed wheel;
from an install without them the command says so and exits 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from seekax.ir.validate import fail

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem != "common")


def register(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks from the repository's benchmarks/ folder", description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run (default: all): {', '.join(available()) or 'none found'}")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a dry run that finishes quickly on a CPU")
    p.add_argument("--json-dir", default=None, help="write NAME.json result files here (created if missing)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    if not available():
        return args.cli_parser.fail_usage(
            f"no benchmarks at {BENCH_DIR}: they live in the seekax repository's benchmarks/ folder, not in the "
            "installed package; run `seekax bench` from a source checkout (pip install -e .)")
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        raise fail("names", unknown, f"names among {available()}")
    if args.json_dir:
        Path(args.json_dir).mkdir(parents=True, exist_ok=True)
    rc = 0
    # One bar on stderr (terminals only) over the benchmarks; their tables stream to stdout above it.
    with tqdm(names, desc="bench", unit="benchmark", disable=None, file=sys.stderr) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            cmd = [sys.executable, str(BENCH_DIR / f"{name}.py")] + (["--quick"] if args.quick else [])
            if args.json_dir:
                cmd += ["--json", str(Path(args.json_dir) / f"{name}.json")]
            tqdm.write(f"== {name}", file=sys.stdout)
            rc |= _stream(cmd, tqdm.write)
    return rc


def _stream(cmd: list[str], write) -> int:
    """Run one benchmark, passing each line of its stdout to `write` as it comes; its exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                write(line.rstrip("\n"), file=sys.stdout)
        except BaseException:
            proc.kill()  # our reader went away (a closed pipe, Ctrl-C): do not leave the benchmark running
            raise
    return proc.returncode
