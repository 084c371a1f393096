"""The one round-and-wrap step (methods.layers.round_and_wrap) and the per-linear decision
(config_for): keep_fp / keep_w8 mean the same for every method, and size.py agrees."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from methods.awq import AWQConfig
from methods.catalog import build
from methods.fptq import FPTQConfig
from methods.gptq import GPTQConfig
from methods.layers import FakeQuantLinear, config_for, iter_block_linears, round_and_wrap
from methods.llmqat import LLMQATConfig
from methods.primitives import round_weight
from methods.quarot import QuaRotConfig
from methods.quip import QuIPConfig
from methods.rtn import RTNConfig
from methods.size import model_size
from methods.smoothquant import SmoothQuantConfig
from tests.conftest import tiny_outlier_setup

KEPT_FP = "model.layers.1.self_attn.q_proj"
MIXED = {"group_size": 32, "keep_fp": (KEPT_FP,), "keep_w8": ("mlp.down_proj",)}
CONFIGS = {
    "rtn": RTNConfig(w_bits=4, a_bits=8, **MIXED),
    "smoothquant": SmoothQuantConfig(w_bits=4, a_bits=8, **MIXED),
    "gptq": GPTQConfig(w_bits=4, **MIXED),
    "awq": AWQConfig(w_bits=4, **MIXED),
    "fptq": FPTQConfig(v0=1.0, v1=40.0, **MIXED),
    "fptq-gptq": FPTQConfig(v0=1.0, v1=40.0, weight_method="gptq", **MIXED),
    "llmqat": LLMQATConfig(n_samples=2, seq_len=16, gen_batch_size=2, steps=2, **MIXED),
    "quip": QuIPConfig(w_bits=4, **MIXED),
    "quarot": QuaRotConfig(w_bits=4, a_bits=8, **MIXED),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_outlier_setup(n_calib=2, seq_len=32)[:3]


def _quantized(tiny, cfg):
    model, spec, calib = tiny
    return build(cfg).quantize(copy.deepcopy(model), spec, calib), spec


@pytest.mark.parametrize("name", list(CONFIGS))
def test_keep_fp_and_keep_w8_mean_the_same_for_every_method(tiny, name):
    cfg = CONFIGS[name]
    q, spec = _quantized(tiny, cfg)
    lo, hi = (-128, 127) if cfg.symmetric else (0, 255)
    for _, rel, full, mod in iter_block_linears(q, spec):
        if full == KEPT_FP:
            assert type(mod) is nn.Linear, full
        elif rel == "mlp.down_proj":
            assert isinstance(mod, FakeQuantLinear) and mod.w_bits == 8, full
            assert mod.group_size is None and mod.w_scale.shape == (mod.out_features, 1)
            assert mod.a_bits == cfg.a_bits and mod.w_symmetric == cfg.symmetric
            codes = mod.codes()
            assert lo <= int(codes.min()) and int(codes.max()) <= hi
            assert codes.unique().numel() > 16          # the 8-bit grid, not the 4-bit one
        else:
            assert isinstance(mod, FakeQuantLinear) and mod.w_bits == 4, full
            assert mod.w_scale.shape == (mod.out_features, mod.in_features // 32)
    size = model_size(q, spec, cfg)
    assert size.kept_fp == [KEPT_FP]
    assert size.kept_w8 == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert size.linears_by_bits == {"w4": 11, "w8": 2, "w16": 1}


def test_awq_reads_keep_fp_by_full_name(tiny):
    """Patterns naming the same linears give the same model: the scale search sees full
    names too (a block-relative name matched `self_attn.q_proj` but not `*.self_attn.q_proj`)."""
    base = {"w_bits": 4, "group_size": 32}
    a, spec = _quantized(tiny, AWQConfig(**base, keep_fp=("self_attn.q_proj",)))
    b, _ = _quantized(tiny, AWQConfig(**base, keep_fp=("*.self_attn.q_proj",)))
    for (key, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert_close(va, vb, rtol=0, atol=0, msg=key)


def test_config_for_keep_w8_is_per_channel_8bit_with_activations_unchanged():
    cfg = RTNConfig(w_bits=8, a_bits=8, group_size=64, act_mode="dynamic_token",
                    keep_w8=("mlp.down_proj",), keep_fp=("o_proj",))
    w8 = config_for(cfg, "model.layers.0.mlp.down_proj")
    assert (w8.w_bits, w8.group_size, w8.a_bits, w8.act_mode) == (8, None, 8, "dynamic_token")
    assert config_for(cfg, "model.layers.0.self_attn.o_proj") is None
    assert config_for(cfg, "model.layers.0.mlp.up_proj") is cfg


def test_round_and_wrap_rtn_equals_the_solved_path_and_checks_static_ranges():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    cfg = RTNConfig(w_bits=4, a_bits=8, group_size=32, symmetric=False)
    W_hat, qp = round_weight(lin.weight.data, 4, 32, symmetric=False)
    rtn = round_and_wrap(copy.deepcopy(lin), cfg, act_range=3.0)
    solved = round_and_wrap(copy.deepcopy(lin), cfg, act_range=3.0, solved=(W_hat, qp))
    for key, v in rtn.state_dict().items():
        assert_close(v, solved.state_dict()[key], rtol=0, atol=0, msg=key)
    assert_close(rtn.act_scale, torch.tensor(3.0 / 127))
    with pytest.raises(ValueError, match="act_range"):
        round_and_wrap(copy.deepcopy(lin), cfg)
    dyn = round_and_wrap(copy.deepcopy(lin), cfg, act_mode="dynamic_token")
    assert dyn.act_mode == "dynamic_token" and dyn.act_scale is None
    with pytest.raises(ValueError, match="solved weights"):
        round_and_wrap(copy.deepcopy(lin), RTNConfig(a_bits=8, act_mode="dynamic_token"),
                       solved=(W_hat, qp))


def _fake_quant_variants() -> dict[str, FakeQuantLinear]:
    torch.manual_seed(0)
    out = {
        "w4-g32-static": round_and_wrap(nn.Linear(64, 16), RTNConfig(
            w_bits=4, a_bits=8, group_size=32), act_range=5.0),
        "w8-asym-dynamic": round_and_wrap(nn.Linear(64, 16, bias=False), RTNConfig(
            w_bits=8, a_bits=8, symmetric=False, act_mode="dynamic_token")),
        "w16a8": round_and_wrap(nn.Linear(64, 16), RTNConfig(a_bits=8,
                                                             act_mode="dynamic_token")),
        "w3-weight-only": round_and_wrap(nn.Linear(64, 16), RTNConfig(w_bits=3, group_size=32)),
    }
    smoothed = round_and_wrap(nn.Linear(64, 16), RTNConfig(w_bits=4, a_bits=8, group_size=32),
                              act_range=2.0)
    smoothed.register_buffer("smooth_inv", torch.rand(64) + 0.5)
    out["smoothed"] = smoothed
    out["bf16"] = round_and_wrap(nn.Linear(64, 16), RTNConfig(
        w_bits=4, a_bits=8, group_size=32), act_range=5.0).to(torch.bfloat16)
    return out


@pytest.mark.parametrize("name", list(_fake_quant_variants()))
def test_fake_quant_layout_rebuilds_the_same_module(name):
    import json

    fq = _fake_quant_variants()[name]
    layout = json.loads(json.dumps(fq.layout()))        # what a manifest stores
    empty = FakeQuantLinear.empty(layout, fq.weight.dtype)
    empty.load_state_dict(fq.state_dict(), strict=True)
    sd = empty.state_dict()
    for key, v in fq.state_dict().items():
        assert sd[key].dtype == v.dtype, key
        assert_close(sd[key], v, rtol=0, atol=0, msg=key)
    assert empty.layout() == layout and empty.w_symmetric == fq.w_symmetric
    x = torch.randn(3, 64, dtype=fq.weight.dtype)
    assert_close(empty(x), fq(x), rtol=0, atol=0)


def test_fake_quant_layout_refuses_unknown_dtypes_and_buffers():
    layout = _fake_quant_variants()["w4-g32-static"].layout()
    with pytest.raises(ValueError, match="dtype 'os.system'"):
        FakeQuantLinear.empty({**layout, "dtypes": {"w_scale": "os.system"}}, torch.float32)
    with pytest.raises(ValueError, match="w_zero"):
        FakeQuantLinear.empty({**layout, "dtypes": {"w_zero": "float32"}}, torch.float32)
    old = {k: v for k, v in layout.items() if k != "dtypes"}     # older checkpoints
    assert FakeQuantLinear.empty(old, torch.float32).w_scale.dtype == torch.float32
