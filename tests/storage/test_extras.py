"""Without the [data] extra, the Loader, data preparation and a tokenizer.json raise ImportError naming the
extra and the command that installs it, not a ModuleNotFoundError from deep inside."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seekax.storage.extras import INSTALL, require_data_extra

# Each case blocks some modules (as if not installed) and runs one entry point; prints the ImportError.
CHILD = textwrap.dedent("""
    import sys
    for name in sys.argv[1].split(","):
        sys.modules[name] = None
    try:
        exec(sys.argv[2])
    except ImportError as e:
        print(type(e).__name__, "|", e.name, "|", e)
    else:
        print("no error")
""")

CASES = [
    ("grain", "from seekax.storage import Loader", "seekax.storage.Loader", "grain"),
    ("duckdb", "from seekax.storage.prep import Session; Session('/tmp/unused-seekax-work')",
     "data preparation", "duckdb"),
    ("pyarrow", "from seekax.storage.extras import require_data_extra; require_data_extra(feature='seekax demo')",
     "seekax demo", "pyarrow"),
    ("tokenizers", "from seekax.storage.tokenizer import HFTokenizer; HFTokenizer('tokenizer.json')",
     "a tokenizer.json tokenizer", "tokenizers"),
]


@pytest.mark.parametrize("blocked,code,feature,missing", CASES, ids=[c[0] for c in CASES])
def test_missing_extra_names_it(blocked, code, feature, missing):
    r = subprocess.run([sys.executable, "-c", CHILD, blocked, code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    kind, name, msg = r.stdout.strip().split(" | ", 2)
    assert kind == "MissingExtraError" and name == missing, r.stdout  # an ImportError subclass
    assert msg.startswith(feature) and f"missing: {missing}" in msg and INSTALL in msg, msg


def test_present_extra_passes():
    require_data_extra(feature="test")
    require_data_extra("numpy", feature="test")
