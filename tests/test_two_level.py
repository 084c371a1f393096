"""Two-level W4A8 weight scales (w_scales=two_level): the quantizer, every W4A8 method, the
simulated model against the runtime model (same integers), checkpoints and size."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch.testing import assert_close

from harness.inputs.models import tiny_llama
from harness.run.pipeline import run_one
from kernels import reference as kref
from methods.arch import ModelSpec
from methods.base import ConfigError
from methods.catalog import build
from methods.checkpoint import load_runtime_checkpoint, save_runtime_checkpoint
from methods.layers import FakeQuantLinear, config_for, iter_block_linears
from methods.primitives import recover_codes, round_weight_two_level
from methods.rtn import RTNConfig
from methods.runtime import W4A8TwoLevelLinear, convert_to_runtime
from methods.size import linear_size
from tests.conftest import TINY_QUICK
from tests.test_runtime import _calib, assert_logits_agree_pair, exact_accumulation, logits

OUTLIERS = {"0.input_layernorm": 40.0, "1.mlp.up_proj": 300.0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# the quantizer (methods.primitives.round_weight_two_level)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_two_level_grid_fits_int8_for_every_group_range(symmetric):
    """Every level-1 group range 0..119 (one group each, both signs, all values in between):
    q8 = s2 * (q - z) lies in int8, s2 is an integer in [1, 17], z in [0, 15], and
    W_hat = s1 * q8 exactly, with s1 an fp16 value."""
    g = 256
    ranges = [(-a, a) for a in range(120)]
    if not symmetric:
        ranges += [(-(a // 3), a) for a in range(120)] + [(-a, a // 3) for a in range(120)]
    W = torch.zeros(len(ranges), 2 * g)
    W[:, 0] = 119.0  # group 0 sets s1 = 1 exactly: the level-1 codes are W itself
    for i, (lo, hi) in enumerate(ranges):
        W[i, g:] = torch.linspace(lo, hi, g).round()  # group 1: the range under test
    W_hat, qp = round_weight_two_level(W, g, symmetric)
    s1 = (qp.scale / qp.scale2).reshape(W.shape[0], -1)
    assert torch.equal(s1, s1[:, :1].expand_as(s1)) and torch.equal(s1.half().float(), s1)
    s2 = qp.scale2.reshape(W.shape[0], -1)
    assert torch.equal(s2, s2.round()) and int(s2.min()) >= 1 and int(s2.max()) <= kref.TWO_LEVEL_MAX_S2
    q = recover_codes(W_hat, qp.scale.reshape(W.shape[0], -1),
                      None if qp.zero is None else qp.zero.reshape(W.shape[0], -1), 4)
    z = 0 if qp.zero is None else qp.zero.reshape(W.shape[0], -1, 1)
    q8 = (q.view(W.shape[0], -1, g) - z) * s2[..., None]
    assert int(q8.min()) >= -128 and int(q8.max()) <= 127
    assert torch.equal(W_hat, (q8 * s1[..., None]).view_as(W))


@pytest.mark.parametrize("symmetric", [True, False])
def test_two_level_error_is_near_group_rtn(symmetric):
    """On Gaussian weights the two-level grid costs a little accuracy against fp16 group
    scales (integer s2 is coarser), never more than 1.6x the RTN error."""
    from methods.primitives import round_weight

    W = torch.randn(64, 512, generator=_gen(0))
    err2 = (round_weight_two_level(W, 128, symmetric)[0] - W).pow(2).mean()
    err1 = (round_weight(W, 4, 128, symmetric)[0] - W).pow(2).mean()
    assert err1 <= err2 <= 1.6 * err1, (float(err1), float(err2))


def test_two_level_config_is_validated_and_labelled():
    cfg = RTNConfig(w_bits=4, a_bits=8, group_size=64, w_scales="two_level")
    assert cfg.bits_label == "w4a8-g64-2l"
    with pytest.raises(ConfigError, match="w_scales=two_level"):
        RTNConfig(w_bits=4, a_bits=16, group_size=64, w_scales="two_level")
    with pytest.raises(ConfigError, match="group_size"):
        RTNConfig(w_bits=4, a_bits=8, group_size=None, w_scales="two_level")
    with pytest.raises(ConfigError, match="w_scales"):
        RTNConfig(w_bits=4, a_bits=8, group_size=64, w_scales="per_tensor")
    w8 = config_for(RTNConfig(w_bits=4, a_bits=8, group_size=64, w_scales="two_level",
                              keep_w8=("*.down_proj",)), "model.layers.0.mlp.down_proj")
    assert (w8.w_bits, w8.group_size, w8.w_scales) == (8, None, "group")


# ---------------------------------------------------------------------------------------
# simulated model == runtime model, per linear and end to end
# ---------------------------------------------------------------------------------------

CASES = [
    RTNConfig(w_bits=4, a_bits=8, group_size=32, act_mode="dynamic_token", w_scales="two_level"),
    RTNConfig(w_bits=4, a_bits=8, group_size=32, act_mode="static_tensor", w_scales="two_level"),
    RTNConfig(w_bits=4, a_bits=8, group_size=64, act_mode="dynamic_token", w_scales="two_level",
              symmetric=False),
]


def _sim(cfg, **kw):
    model = tiny_llama(outliers=OUTLIERS, **kw)
    spec = ModelSpec.from_model(model, "tiny-llama")
    method = build(cfg)
    return method.quantize(model, spec, _calib() if method.needs_calibration else None), spec


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.act_mode}-sym{c.symmetric}")
def test_runtime_equals_simulation_integer_for_integer(cfg, monkeypatch):
    """Each W4A8TwoLevelLinear's int8 weight s2 * (q - z), times s1, is the simulated W_hat
    bit for bit; with exact accumulation the whole models agree to fp64 rounding."""
    sim, spec = _sim(cfg)
    report: dict = {}
    rt = convert_to_runtime(copy.deepcopy(sim), spec, report)
    assert report["converted"] == {"W4A8TwoLevelLinear": 14}
    for (_, _, name, fq), (_, _, _, mod) in zip(iter_block_linears(sim, spec),
                                                iter_block_linears(rt, spec), strict=True):
        assert isinstance(fq, FakeQuantLinear) and isinstance(mod, W4A8TwoLevelLinear), name
        codes = kref.from_kernel_layout(mod.w_packed, mod.group_size)
        q8 = kref.two_level_int8_weight(codes, mod.w_scale2, mod.w_zero, mod.group_size)
        assert torch.equal(q8.float() * mod.w_scale.float()[:, None], fq.weight.float()), name
    a, b = logits(sim), logits(rt)
    assert_logits_agree_pair(a, b)
    exact_accumulation(monkeypatch)
    monkeypatch.setattr(kref, "w4a8_two_level_ref",
                        functools.partial(kref.w4a8_two_level_ref, acc_dtype=torch.float64))
    a, b = logits(sim), logits(rt)
    assert_close(b, a, rtol=0, atol=1e-6 * float(a.abs().max()))


METHODS = ["gptq", "awq", "smoothquant", "fptq"]


@pytest.mark.parametrize("method", METHODS)
def test_every_w4a8_method_emits_two_level_weights(method, compose_cfg):
    """method.w_scales=two_level composed into the real method configs: every quantized block
    linear holds the two-level grid and converts to W4A8TwoLevelLinear."""
    from harness.run.pipeline import build_method

    cfg = compose_cfg(*TINY_QUICK, f"method={method}", "bits=w4a8", "bits.group_size=32",
                      "method.w_scales=two_level")
    m = build_method(cfg.method)
    assert m.config.w_scales == "two_level"
    model = tiny_llama(outliers=OUTLIERS)
    spec = ModelSpec.from_model(model, "tiny-llama")
    sim = m.quantize(model, spec, _calib(n=2, seqlen=32) if m.needs_calibration else None)
    fqs = [mod for *_, mod in iter_block_linears(sim, spec) if isinstance(mod, FakeQuantLinear)]
    assert fqs and all(fq.w_scale2 is not None for fq in fqs)
    report: dict = {}
    convert_to_runtime(sim, spec, report)
    assert report["converted"] == {"W4A8TwoLevelLinear": len(fqs)}


def test_pipeline_records_two_level_runs(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a8", "bits.group_size=32",
                              "method.w_scales=two_level", "runtime=true"))
    assert rec.status == "ok", rec.error
    assert rec.provenance["method"]["w_scales"] == "two_level"
    assert rec.artifacts["runtime"]["converted"] == {"W4A8TwoLevelLinear": 14}


# ---------------------------------------------------------------------------------------
# checkpoint and size
# ---------------------------------------------------------------------------------------


def test_two_level_checkpoint_round_trip_and_older_versions_load(tmp_path):
    cfg = CASES[2]
    sim, spec = _sim(cfg)
    rt = convert_to_runtime(copy.deepcopy(sim), spec)
    for model, name in ((rt, "rt"), (sim, "sim")):
        path = save_runtime_checkpoint(model, spec, tmp_path / name)
        loaded = load_runtime_checkpoint(path)
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert_close(b, a, rtol=0, atol=0, msg=k)
            assert a.dtype == b.dtype, k
        assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    # a version-2 file (before two-level scales) still loads as it did
    plain = convert_to_runtime(copy.deepcopy(_sim(RTNConfig(w_bits=4, a_bits=8, group_size=32))[0]), spec)
    path = save_runtime_checkpoint(plain, spec, tmp_path / "v2")
    cfg_file = path / "ptq_runtime.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "format_version": 2}))
    assert_close(logits(load_runtime_checkpoint(path)), logits(plain), rtol=0, atol=0)


def test_two_level_size_counts_integer_group_scales():
    sim, spec = _sim(CASES[0])
    fq = sim.get_submodule("model.layers.0.mlp.down_proj")
    n, k = fq.weight.shape
    groups = k // 32
    assert linear_size(fq).weight_bits == n * k * 4 + 8 * n * groups + 16 * n
