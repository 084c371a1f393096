"""Our top-level `kernels` package must not be taken for Hugging Face's `kernels` hub client
(transformers probes it before loading models and would try to fetch hub kernels)."""

import importlib.util
import subprocess
import sys

from tests.conftest import REPO


def test_transformers_does_not_take_our_kernels_package():
    code = ("import importlib.util, transformers.utils as u; "
            "assert importlib.util.find_spec('kernels') is not None; "
            "print(u.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_our_kernels_is_the_one_found():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and str(REPO) in str(spec.origin)
