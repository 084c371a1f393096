"""Time the reference-library (alignment) tests that `make test` now runs, and write
results/ci/make_test.json (the README cites it). Run from the repo root after
`make install-baselines install-gptqmodel`:

    python scripts/ci_alignment_timing.py [--install-seconds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ALIGNMENT_TESTS = [
    "tests/test_gptq_awq.py::test_llmcompressor_baseline_runs",
    "tests/test_gptq_awq.py::test_gptqmodel_baseline_runs_through_the_pipeline",
    "tests/test_gptq_awq.py::test_gptqmodel_codes_equal_native_gptq",
    "tests/test_gptq_awq.py::test_llmcompressor_awq_codes_equal_native_awq_on_its_grid",
    "tests/test_grid.py::test_native_rtn_full_grid_equals_llmcompressor_codes",
]


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install-seconds", type=float, default=None,
                    help="measured wall time of the GPTQModel --no-deps install (sdist build)")
    ap.add_argument("--out", default="results/ci/make_test.json")
    args = ap.parse_args()
    junit = Path(args.out).with_suffix(".junit.xml")
    junit.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "not slow and not gpu", f"--junitxml={junit}", *ALIGNMENT_TESTS])
    wall = time.perf_counter() - t0
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = ("skipped" if case.find("skipped") is not None else
                   "failed" if case.find("failure") is not None or case.find("error") is not None
                   else "passed")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                      "seconds": round(float(case.get("time", 0)), 2), "outcome": outcome})
    junit.unlink()
    out = {"what": "reference-library alignment tests added to `make test`",
           "pytest_wall_s": round(wall, 1), "exit_code": rc,
           "passed": sum(c["outcome"] == "passed" for c in cases),
           "skipped": sum(c["outcome"] == "skipped" for c in cases),
           "failed": sum(c["outcome"] == "failed" for c in cases),
           "gptqmodel_install_wall_s": args.install_seconds,
           "versions": {p: _version(p) for p in ("torch", "llmcompressor", "gptqmodel",
                                                  "transformers")},
           "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                    "load_avg_1min": round(os.getloadavg()[0], 1)},
           "cases": cases}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in out.items() if k != "cases"}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
