"""The symmetric integer grid setting (w_grid / a_grid) and the act_range estimators, end to
end: codes on the full grid reach -2^(b-1), the runtime path equals the simulation, and
native RTN on the full grid gives llm-compressor's codes exactly."""
import copy

import pytest
import torch

from harness.inputs.models import tiny_llama
from methods.arch import ModelSpec
from methods.base import ConfigError
from methods.catalog import build
from methods.layers import FakeQuantLinear, iter_block_linears
from methods.primitives import grid_divisor, quantize_weight
from methods.rtn import RTNConfig
from tests.test_runtime import (
    OUTLIERS,
    _calib,
    assert_logits_agree_pair,
    exact_accumulation,
    logits,
    runtime_of,
)


def test_grid_divisors_and_full_grid_codes():
    assert grid_divisor(4, "narrow") == 7.0 and grid_divisor(4, "full") == 7.5
    assert grid_divisor(8, "narrow") == 127.0 and grid_divisor(8, "full") == 127.5
    W = torch.tensor([[-3.0, 3.0, 1.0, -0.2]])
    q, qp = quantize_weight(W, 4, None, grid="full")
    torch.testing.assert_close(qp.scale.flatten(), torch.tensor([0.4]))
    assert q.tolist() == [[-8, 7, 2, 0]]        # -max -> -8; +max clamps to 7 (7.5 -> 8)
    q, _ = quantize_weight(W, 4, None, grid="narrow")
    assert q.tolist() == [[-7, 7, 2, 0]]


def test_grid_settings_are_validated():
    with pytest.raises(ConfigError, match="w_grid"):
        RTNConfig(w_bits=4, w_grid="wide")
    with pytest.raises(ConfigError, match="symmetric weights only"):
        RTNConfig(w_bits=4, symmetric=False, w_grid="full")
    with pytest.raises(ConfigError, match="act_range"):
        RTNConfig(w_bits=4, a_bits=8, act_range="kl")
    with pytest.raises(ConfigError, match="act_percentile"):
        RTNConfig(w_bits=4, a_bits=8, act_range="percentile", act_percentile=20)


def _quantized(cfg):
    model = tiny_llama(outliers=OUTLIERS)
    spec = ModelSpec.from_model(model, "tiny-llama")
    method = build(cfg)
    return method.quantize(model, spec, _calib() if method.needs_calibration else None), spec


FULL = dict(w_bits=4, a_bits=8, group_size=32, w_grid="full", a_grid="full",
            act_mode="static_tensor")


@pytest.mark.parametrize("act_range", ["minmax", "mse"])
def test_full_grid_w4a8_runtime_equals_simulation(act_range, monkeypatch):
    """Codes -8 reach the packed int4 kernel path intact: with exact accumulation on both
    sides the runtime model equals the simulation (static scales on the full grid, clipped
    by the MSE estimator or not)."""
    sim, spec = _quantized(RTNConfig(**FULL, act_range=act_range))
    codes = torch.cat([m.codes().flatten() for _, _, _, m in iter_block_linears(sim, spec)])
    assert int(codes.min()) == -8 and int(codes.max()) == 7
    rt, report = runtime_of(sim, spec)
    assert report["converted"] == {"W4A8Linear": 14}
    assert_logits_agree_pair(logits(sim), logits(rt))
    exact_accumulation(monkeypatch)
    a, b = logits(sim), logits(rt)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * float(a.abs().max()))


def _block0_act_scales(model, spec):
    return torch.stack([m.act_scale for i, _, _, m in iter_block_linears(model, spec)
                        if i == 0 and m.act_scale is not None])


def test_act_range_estimators_set_static_scales():
    """percentile / mse ranges are at most max|X| (block 0: later blocks see inputs that
    depend on the earlier blocks' quantization)."""
    scales = {}
    for est in ("minmax", "percentile", "mse"):
        sim, spec = _quantized(RTNConfig(w_bits=4, a_bits=8, group_size=32,
                                         act_mode="static_tensor", act_range=est))
        scales[est] = _block0_act_scales(sim, spec)
    assert (scales["percentile"] <= scales["minmax"]).all()
    assert (scales["mse"] <= scales["minmax"] * (1 + 1e-6)).all()
    assert (scales["percentile"] < scales["minmax"]).any()


def test_static_methods_take_the_estimator():
    """Every static-activation method routes act_range into its static scales."""
    from methods.fptq import FPTQConfig
    from methods.gptq import GPTQConfig
    from methods.smoothquant import SmoothQuantConfig
    base = dict(w_bits=4, a_bits=8, group_size=32)
    for make in (lambda **k: GPTQConfig(**base, act_mode="static_tensor", **k),
                 lambda **k: SmoothQuantConfig(**base, **k),
                 lambda **k: FPTQConfig(**base, policy="all_static", **k)):
        ref, spec = _quantized(make())
        est, _ = _quantized(make(act_range="percentile", act_percentile=99.0))
        a, b = _block0_act_scales(ref, spec), _block0_act_scales(est, spec)
        assert a.shape == b.shape and a.numel() > 0
        assert (b <= a * (1 + 1e-6)).all() and (b < a).any()


def test_native_rtn_full_grid_equals_llmcompressor_codes():
    """Round-to-nearest is data-free: on compressed-tensors' grid (w_grid=full) the native
    codes and scales equal llm-compressor's exactly, every linear of tiny-llama."""
    pytest.importorskip("llmcompressor", reason="baselines extra not installed")
    from methods.baselines import LLMCompressorRTNConfig
    kw = dict(w_bits=4, a_bits=16, group_size=32)
    native, spec = _quantized(RTNConfig(**kw, w_grid="full"))
    model = tiny_llama(outliers=OUTLIERS)
    library = build(LLMCompressorRTNConfig(**kw)).quantize(copy.deepcopy(model), spec,
                                                           _calib(n=1))
    n = 0
    for (_, _, full, a), (_, _, _, b) in zip(iter_block_linears(native, spec),
                                             iter_block_linears(library, spec), strict=True):
        assert isinstance(a, FakeQuantLinear) and isinstance(b, FakeQuantLinear), full
        torch.testing.assert_close(a.w_scale, b.w_scale, rtol=0, atol=0, msg=full)
        torch.testing.assert_close(a.codes(), b.codes(), rtol=0, atol=0, msg=full)
        n += 1
    assert n == 14
    narrow, _ = _quantized(RTNConfig(**kw))
    differs = [not torch.equal(a.codes(), b.codes()) for (*_, a), (*_, b) in
               zip(iter_block_linears(narrow, spec), iter_block_linears(library, spec),
                   strict=True)]
    assert all(differs)                 # the narrow grid is a different quantizer
