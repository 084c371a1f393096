"""One launch per linear group (methods.fusion): fused q/k/v and gate/up GEMMs and the
RMSNorm that quantizes their input give the unfused runtime model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from harness.inputs.models import tiny_llama
from methods.arch import ModelSpec
from methods.catalog import build
from methods.fusion import FusedRMSNormQuant, GroupSlice, fuse_runtime
from methods.rtn import RTNConfig
from methods.runtime import convert_to_runtime
from methods.smoothquant import SmoothQuantConfig

OUTLIERS = {"0.input_layernorm": 40.0, "1.mlp.up_proj": 300.0}
TOKENS = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def _calib():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 320, (1, 64), generator=gen) for _ in range(4)]


def _runtime(cfg):
    model = tiny_llama(outliers=OUTLIERS)
    spec = ModelSpec.from_model(model, "tiny-llama")
    m = build(cfg)
    sim = m.quantize(model, spec, _calib() if m.needs_calibration else None)
    return convert_to_runtime(sim, spec), spec


CASES = [
    RTNConfig(w_bits=4, a_bits=8, group_size=32, act_mode="dynamic_token"),
    RTNConfig(w_bits=4, a_bits=8, group_size=32, act_mode="static_tensor"),
    RTNConfig(w_bits=4, a_bits=8, group_size=32, act_mode="dynamic_token", w_scales="two_level"),
    RTNConfig(w_bits=8, a_bits=8, group_size=None, act_mode="dynamic_token"),
    SmoothQuantConfig(w_bits=8, a_bits=8, group_size=None),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{type(c).__name__}-{c.bits_label}-{c.act_mode}")
def test_fused_runtime_equals_unfused(cfg):
    rt, spec = _runtime(cfg)
    fused = copy.deepcopy(rt)
    report: dict = {}
    fuse_runtime(fused, spec, report)
    assert report["groups"] == 2 * spec.num_layers and not report["kept"], report
    assert report["norms"] == 2 * spec.num_layers
    block = fused.model.layers[0]
    assert isinstance(block.self_attn.k_proj, GroupSlice)
    assert isinstance(block.input_layernorm, FusedRMSNormQuant)
    calls = {"gemm": 0}
    for mod in fused.modules():
        if type(mod).__name__ == "FusedLinearGroup":
            mod.linear.register_forward_hook(lambda *a: calls.__setitem__("gemm", calls["gemm"] + 1))
    with torch.no_grad():
        a = rt(input_ids=TOKENS).logits
        b = fused(input_ids=TOKENS).logits
    assert calls["gemm"] == 2 * spec.num_layers   # one GEMM per group per forward
    assert_close(b, a, rtol=0, atol=0)            # reference path: the same numbers


def test_groups_with_different_quantizers_stay_unfused():
    rt, spec = _runtime(CASES[1])
    with torch.no_grad():
        rt.model.layers[0].self_attn.k_proj.act_scale.mul_(2)
    report: dict = {}
    fuse_runtime(rt, spec, report)
    assert report["kept"] == {"model.layers.0.qkv": "different act_scale"}
    assert report["groups"] == 2 * spec.num_layers - 1


def test_pipeline_runtime_fuse(compose_cfg):
    from harness.run.pipeline import run_one
    from tests.conftest import TINY_QUICK

    base = [*TINY_QUICK, "method=rtn", "bits=w4a8", "bits.group_size=32", "runtime=true"]
    plain = run_one(compose_cfg(*base))
    fused = run_one(compose_cfg(*base, "+runtime_fuse=true"))
    assert plain.status == fused.status == "ok", (plain.error, fused.error)
    assert fused.artifacts["runtime_fusion"]["groups"] == 4
    assert fused.metrics["ppl_ptb"] == plain.metrics["ppl_ptb"]
