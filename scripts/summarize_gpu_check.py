"""Merge benchmark JSONs and the gpu pytest junit XML into results.json and print a short table."""

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

bench_dir, junit, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
results = {"benchmarks": {}, "pytest": {}}
for f in sorted(bench_dir.glob("*.json")):
    results["benchmarks"][f.stem] = json.loads(f.read_text())
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    results["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
out.write_text(json.dumps(results, indent=1))
p = results["pytest"]
print(f"pytest -m gpu: {p.get('tests', 0)} tests, {p.get('failures', 0)} failures, {p.get('errors', 0)} errors, "
      f"{p.get('skipped', 0)} skipped")
for name, data in results["benchmarks"].items():
    rows = data.get("rows", [])
    print(f"[{name}] {data.get('meta', {}).get('device', '?')}: {len(rows)} rows")
    for r in rows:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
