"""The Method interface outside quantize(): code version (cache keys), optional hooks,
the catalog (build / available / config defaults)."""

from __future__ import annotations

from methods.awq import AWQConfig
from methods.base import build
from methods.fptq import FPTQConfig
from methods.rtn import RTNConfig


def _names(method) -> set[str]:
    return {p.name for p in method.code_files()}


def test_code_files_follow_imports_including_lazy_ones():
    fptq = _names(build(FPTQConfig()))
    # fptq imports GPTQSolver inside a function and SmoothQuant's scale at module level
    assert {"fptq.py", "gptq.py", "smoothquant.py", "smoothing.py", "layers.py",
            "primitives.py", "base.py", "blockwise.py", "arch.py"} <= fptq
    assert "awq.py" not in fptq
    assert "smoothquant.py" not in _names(build(RTNConfig(w_bits=4)))


def test_code_version_depends_on_declared_extra_modules():
    rtn = build(RTNConfig(w_bits=4))
    plain = rtn.code_version()
    assert len(plain) == 16 and plain == build(RTNConfig(w_bits=8)).code_version()
    type(rtn).extra_code_modules = ("methods.awq",)
    try:
        assert "awq.py" in _names(rtn) and rtn.code_version() != plain
    finally:
        del type(rtn).extra_code_modules
    assert build(AWQConfig(w_bits=4)).code_version() != plain
