"""The Method interface outside quantize(): code version (cache keys), optional hooks,
the catalog (build / available / config defaults)."""

from __future__ import annotations

from methods.awq import AWQConfig
from methods.catalog import build
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
    rtn = _names(build(RTNConfig(w_bits=4)))
    assert "smoothquant.py" not in rtn and "fp16.py" not in rtn    # base imports no method


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


def test_optional_hooks_have_declared_defaults():
    from methods.base import Method
    from methods.fptq import FPTQ

    rtn = build(RTNConfig(w_bits=4))
    assert rtn.cacheable is True and rtn.write_artifacts("unused") == {}
    assert FPTQ.write_artifacts is not Method.write_artifacts     # overridden, not found by name


def test_quantize_only_quantizes_just_the_named_linears():
    import copy

    import torch
    from torch import nn

    from harness.inputs.models import tiny_llama
    from methods.arch import ModelSpec
    from methods.layers import FakeQuantLinear, iter_block_linears

    model = tiny_llama()
    spec = ModelSpec.from_model(model, "tiny")
    calib = [torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))]
    wanted = {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"}
    for cfg in (RTNConfig(w_bits=4, group_size=32, keep_fp=("o_proj",)),
                AWQConfig(w_bits=4, group_size=32, n_grid=2, clip=False)):
        q = build(cfg).quantize_only(copy.deepcopy(model), spec, calib, wanted)
        got = {full for _, _, full, mod in iter_block_linears(q, spec)
               if isinstance(mod, FakeQuantLinear)}
        assert got == wanted, cfg
        assert all(type(m) in (nn.Linear, FakeQuantLinear)
                   for _, _, _, m in iter_block_linears(q, spec))


def test_catalog_sits_above_base_and_lists_the_builtin_methods():
    import ast
    from pathlib import Path

    import methods.base as base
    from methods.catalog import BUILTIN_METHODS, available, config_field_defaults

    imported = {n.module for n in ast.walk(ast.parse(Path(base.__file__).read_text()))
                if isinstance(n, ast.ImportFrom) and n.module}
    above = {f"methods.{m}" for m in BUILTIN_METHODS} | {"methods.catalog"}
    assert not imported & above, imported & above
    assert {"fp16", "rtn", "smoothquant", "gptq", "awq", "fptq"} <= set(available())
    assert config_field_defaults("methods.awq.AWQConfig")["n_grid"] == 20
    assert config_field_defaults("methods.nope.Config") is None


def test_old_fptq_records_read_with_the_nested_gptq_node():
    from harness.results.records import with_defaults

    old = {"_target_": "methods.fptq.FPTQConfig", "v0": 15.0, "weight_method": "gptq",
           "gptq_damp": 0.1, "gptq_act_order": False}
    got = with_defaults(old)
    assert not any(k.startswith("gptq_") for k in got)
    assert got["gptq"] == {"damp": 0.1, "block_size": 128, "act_order": False,
                           "static_groups": True, "max_damp_retries": 4}
    assert FPTQConfig(gptq={"damp": 0.1}).gptq.damp == 0.1
