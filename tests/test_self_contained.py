"""The repository is self-contained: no file names an absolute path outside its own tree."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Absolute paths that are fine to name: system folders, temp dirs, device files, and this file's own patterns.
ALLOWED_PREFIXES = ("/dev/", "/proc/", "/sys/", "/usr/", "/bin/", "/etc/", "/lib", "/opt/", "/var/", "/tmp",
                    "/path/to/", "/dev/shm")
# A quoted or whitespace-preceded absolute path with at least two components, e.g. "/work/x" or '/home/u/x'.
ABSOLUTE = re.compile(r"""(?:^|[\s"'`(=])(/[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]*)""")
RELATIVE_OUT = re.compile(r"""\.\./shared\b""")


def _tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.suffix in {".py", ".sh", ".md", ".toml", ".txt", ".cfg", ".ini", ".json", ""} \
                and path.is_file() and not name.startswith("tests/data/") \
                and name != ".gitignore":  # .gitignore's leading / anchors at the repository root
            yield name, path


def test_no_path_outside_the_repository():
    bad = []
    for name, path in _tracked_files():
        if name == "tests/test_self_contained.py":
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in ABSOLUTE.finditer(line):
                p, before = m.group(1), line[:m.start(1)]
                # "$HOME"/.x and ${var}/x are relative to a variable, not absolute.
                if not p.startswith(ALLOWED_PREFIXES) and not before.endswith(('$HOME"', "$HOME", "}")):
                    bad.append(f"{name}:{lineno}: {p}")
            if RELATIVE_OUT.search(line):
                bad.append(f"{name}:{lineno}: ../shared")
    assert not bad, "paths outside the repository (copy what they need into tests/data/):\n" + "\n".join(bad)


def test_the_check_finds_an_outside_path():
    assert ABSOLUTE.search('open("/work/shared/reference/eplb_cases.jsonl")')
    assert ABSOLUTE.search("see /home/user/data.npy")
    assert not ABSOLUTE.search("a/b/c relative and 3/4 ratios")
