"""Scale folding, SmoothQuant and FPTQ on tiny-llama with activation outliers of known size.

The outlier model (4 heads, 2 KV heads: GQA) has, with the fixed calibration below,
  block 0 q/k/v: v ~ 96   (input_layernorm x40)   -> middle bucket (LAE)
  block 0 o:     v ~ 25                             -> middle bucket (LAE, fold into v_proj)
  block 1 down:  v ~ 380  (up_proj x400)           -> dynamic per-token
  everything else v < 4                            -> static per-tensor
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

from harness.inputs.models import tiny_llama
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from methods.base import ConfigError
from methods.blockwise import capture_block_inputs, collect_block_stats
from methods.catalog import build
from methods.fptq import (
    STRATEGY_COLOURS,
    FPTQConfig,
    assign_bucket,
    lae_scale,
    plot_policy,
    policy_figure,
)
from methods.layers import FakeQuantLinear
from methods.rtn import RTNConfig
from methods.smoothing import (
    fold_group_scale,
    fold_norm_params,
    group_weight_channel_max,
    needs_kv_sharing,
    share_across_kv_repeat,
)
from methods.smoothquant import SmoothQuantConfig, group_input_max, smoothquant_scale
from tests.conftest import TINY_QUICK

OUTLIERS = {"0.input_layernorm": 40.0, "1.mlp.up_proj": 400.0}
G = 32   # tiny-llama's group size (hidden 64, intermediate 128)


def _tokens(seed: int, n: int, T: int = 64) -> list[torch.Tensor]:
    return [torch.randint(3, 300, (1, T), generator=torch.Generator().manual_seed(seed + k))
            for k in range(n)]


@pytest.fixture(scope="module")
def outlier_model():
    model = tiny_llama(outliers=OUTLIERS)
    return model, ModelSpec.from_model(model, "tiny-outliers")


@pytest.fixture(scope="module")
def calib():
    """One sample holding every token id once (layer 0's input range depends on the token
    alone, so held-out tokens cannot exceed it), plus random samples."""
    every_id = torch.randperm(317, generator=torch.Generator().manual_seed(0))[None] + 3
    return [every_id, *_tokens(0, 3)]


@pytest.fixture(scope="module")
def held_out():
    return torch.cat(_tokens(1000, 2))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel_err(model: nn.Module, ref: torch.Tensor, ids: torch.Tensor) -> float:
    out = _logits(model, ids)
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.fixture(scope="module")
def fptq_run(outlier_model, calib):
    model, spec = outlier_model
    m = copy.deepcopy(model)
    method = build(FPTQConfig(group_size=G, v0=15.0))   # the paper's buckets
    method.quantize(m, spec, calib)
    return m, method


# ------------------------------------------------------------------ folding keeps the function

@pytest.mark.parametrize("kind", ["rmsnorm", "rmsnorm_plus_one", "layernorm"])
def test_norm_fold_divides_output_by_s(kind):
    gen = torch.Generator().manual_seed(0)
    x_hat = torch.randn(5, 16, generator=gen)
    w, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    s = torch.rand(16, generator=gen) + 0.5
    bias = b if kind == "layernorm" else None

    def out(w_, b_):
        scale = (1 + w_) if kind == "rmsnorm_plus_one" else w_
        return x_hat * scale + (b_ if b_ is not None else 0)

    w2, b2 = fold_norm_params(w, bias, s, kind)
    torch.testing.assert_close(out(w2, b2), out(w, bias) / s)


@pytest.mark.parametrize("scale_fn", ["lae", "smoothquant"])
def test_smoothing_keeps_fp_function(outlier_model, calib, held_out, scale_fn):
    """Fold s into every group (norms and the v->o, up->down linear feeders under GQA)."""
    model, spec = outlier_model
    m = copy.deepcopy(model)
    ref = _logits(m, held_out)
    inputs = capture_block_inputs(m, spec, calib)
    folded = []
    for block in spec.blocks(m):
        stats = collect_block_stats(block, inputs, spec.table.linear_names())
        for group in spec.table.groups:
            x_max = group_input_max(stats, group)
            w_max = group_weight_channel_max(block, group)
            if needs_kv_sharing(block, group):
                x_max, w_max = share_across_kv_repeat(x_max, spec), share_across_kv_repeat(w_max,
                                                                                          spec)
            s = lae_scale(x_max) if scale_fn == "lae" else smoothquant_scale(x_max, w_max, 0.5)
            folded.append(fold_group_scale(block, group, s, spec, allow_linear_feeders=True))
        inputs.advance(block)
    assert all(folded) and len(folded) == 2 * len(spec.table.groups)
    assert spec.kv_repeat == 2
    torch.testing.assert_close(_logits(m, held_out), ref, rtol=1e-4, atol=1e-4)


def test_gqa_fold_refused_when_s_not_shared(outlier_model):
    model, spec = outlier_model
    block = copy.deepcopy(spec.blocks(model)[0])
    group = spec.table.group_of("self_attn.o_proj")
    before = block.self_attn.v_proj.weight.clone()
    s = torch.rand(spec.num_heads * spec.head_dim, generator=torch.Generator().manual_seed(0))
    res = fold_group_scale(block, group, s + 0.5, spec, allow_linear_feeders=True)
    assert not res and "share_across_kv_repeat" in res.reason
    torch.testing.assert_close(block.self_attn.v_proj.weight, before)
    off = fold_group_scale(block, group, torch.ones_like(s), spec, allow_linear_feeders=False)
    assert not off and "fold_linear_feeders=false" in off.reason


# ------------------------------------------------------------------ FPTQ policy

def test_policy_buckets_on_known_outliers(fptq_run):
    model, method = fptq_run
    policy = method.artifacts["fptq_policy"]
    rows = {r["linear"].removeprefix("model.layers."): r for r in policy["rows"]}
    assert len(rows) == 14
    for r in rows.values():
        assert r["bucket"] == assign_bucket(r["v"], 15.0, 150.0)
    for name in ("0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj",
                 "0.self_attn.o_proj"):
        assert rows[name]["bucket"] == "lae" and rows[name]["strategy"] == "lae+static"
        assert rows[name]["range_after"] < 15.0 < rows[name]["v"]
    assert rows["1.mlp.down_proj"]["bucket"] == "dynamic"
    assert rows["1.mlp.down_proj"]["v"] > 150.0
    static = set(rows) - {"0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj",
                          "0.self_attn.o_proj", "1.mlp.down_proj"}
    assert all(rows[n]["strategy"] == "static" for n in static)
    assert policy["counts"]["bucket"] == {"lae": 4, "static": 9, "dynamic": 1}
    # linears reading one input share one decision
    for (blk, role) in {(r["block"], r["role"]) for r in rows.values()}:
        group = [r for r in rows.values() if r["block"] == blk and r["role"] == role]
        assert len({(r["v"], r["bucket"], r["strategy"], r["range_after"]) for r in group}) == 1
    # the modules carry exactly what the report says
    q = model.model.layers[0].self_attn.q_proj
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(q, FakeQuantLinear) and q.act_mode == "static_tensor"
    assert q.group_size == G and q.w_scale.shape == (q.out_features, q.in_features // G)
    torch.testing.assert_close(float(q.act_scale), rows["0.self_attn.q_proj"]["range_after"] / 127)
    assert down.act_mode == "dynamic_token" and down.smooth_inv is None


def test_v0_zero_equalizes_every_group_below_v1(outlier_model, calib, held_out):
    """v0=0: no plain-static bucket; every group with v <= v1 gets LAE before its static
    scale, the groups above v1 stay dynamic, and the fp function is kept until rounding."""
    model, spec = outlier_model
    m = copy.deepcopy(model)
    method = build(FPTQConfig(group_size=G, v0=0.0))
    method.quantize(m, spec, calib)
    rows = method.artifacts["fptq_policy"]["rows"]
    assert {r["bucket"] for r in rows} == {"lae", "dynamic"}
    for r in rows:
        assert r["bucket"] == ("dynamic" if r["v"] > 150.0 else "lae")
        if r["bucket"] == "lae":
            # X_j / s_j = log2(2 + max|X_j|): the equalized range is at most log2(2 + v)
            assert r["strategy"] == "lae+static"
            assert r["range_after"] <= math.log2(2.0 + r["v"]) * (1 + 1e-5)
    assert method.artifacts["fptq_policy"]["counts"]["bucket"] == {"lae": 13, "dynamic": 1}


def test_fallback_recorded_when_no_fold_asymmetric_weights(outlier_model, calib):
    model, spec = outlier_model
    m = copy.deepcopy(model)
    method = build(FPTQConfig(group_size=G, v0=15.0, fold_linear_feeders=False,
                                 symmetric=False))
    method.quantize(m, spec, calib)
    q = m.model.layers[0].self_attn.q_proj
    assert not q.w_symmetric and q.w_zero.shape == q.w_scale.shape
    row = next(r for r in method.artifacts["fptq_policy"]["rows"]
               if r["linear"] == "model.layers.0.self_attn.o_proj")
    assert row["bucket"] == "lae" and row["strategy"] == "dynamic"
    assert "fold_linear_feeders=false" in row["fallback_reason"]
    assert m.model.layers[0].self_attn.o_proj.act_mode == "dynamic_token"
    assert method.artifacts["fptq_policy"]["counts"]["fallbacks"] == 1


def test_fptq_beats_rtn_w4a8_static(outlier_model, calib, held_out, fptq_run):
    model, spec = outlier_model
    ref = _logits(model, held_out)
    rtn = copy.deepcopy(model)
    build(RTNConfig(w_bits=4, a_bits=8, group_size=G)).quantize(rtn, spec, calib)
    assert _rel_err(fptq_run[0], ref, held_out) < 0.75 * _rel_err(rtn, ref, held_out)


def test_smoothquant_w8a8_beats_rtn_w8a8_static(outlier_model, calib, held_out):
    model, spec = outlier_model
    ref = _logits(model, held_out)
    errs = {}
    for cfg in (RTNConfig(w_bits=8, a_bits=8), SmoothQuantConfig(w_bits=8, a_bits=8),
                SmoothQuantConfig(w_bits=8, a_bits=8, fold_linear_feeders=True)):
        m = copy.deepcopy(model)
        build(cfg).quantize(m, spec, calib)
        errs[cfg] = _rel_err(m, ref, held_out)
    rtn, sq, sq_all = errs.values()
    assert sq < 0.5 * rtn and sq_all < 0.5 * rtn
    # feeders (v_proj, up_proj) were rescaled before being rounded: still on their grid
    for lin in (m.model.layers[0].self_attn.v_proj, m.model.layers[1].mlp.up_proj):
        codes = lin.weight / lin.w_scale
        torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)


def test_fptq_kv_cache_is_the_shared_setting(outlier_model, calib, held_out):
    """FPTQ's KV option is QuantConfig.kv_bits (tests/test_kvcache.py); its old per-head
    static mode is kv_granularity=per_head, calibrated on the quantized model."""
    model, spec = outlier_model
    m = copy.deepcopy(model)
    method = build(FPTQConfig(group_size=G, kv_bits=8, kv_granularity="per_head"))
    method.quantize(m, spec, calib)
    without = _logits(m, held_out)
    method.quantize_kv_cache(m, spec, calib)
    k = m.model.layers[0].self_attn.kv_quant
    assert k.granularity == "per_head" and k.k_max.shape == (spec.num_kv_heads,)
    assert (_logits(m, held_out) - without).abs().max() > 0 and k.calls > 0
    with pytest.raises(ValueError, match="runtime=false"):
        method.to_runtime(m, spec)


@pytest.mark.skipif(importlib.util.find_spec("methods.gptq") is None,
                    reason="methods.gptq (GPTQSolver) is not in this build")
def test_fptq_gptq_weights(outlier_model, calib, held_out, fptq_run):
    model, spec = outlier_model
    ref = _logits(model, held_out)
    m = copy.deepcopy(model)
    method = build(FPTQConfig(group_size=G, weight_method="gptq"))
    assert method.check(spec) is None
    method.quantize(m, spec, calib)
    assert isinstance(m.model.layers[1].mlp.down_proj, FakeQuantLinear)
    assert _rel_err(m, ref, held_out) < 1.5 * _rel_err(fptq_run[0], ref, held_out)
    # GPTQ, not an RTN fallback: every quantized weight differs from the RTN path's (same
    # LAE scales, same grid), while still being codes on that grid (scale * integer)
    rtn_model = fptq_run[0]
    for name, mod in m.named_modules():
        if isinstance(mod, FakeQuantLinear) and mod.w_scale is not None:
            rtn_mod = rtn_model.get_submodule(name)
            assert not torch.equal(mod.weight, rtn_mod.weight), f"{name}: RTN weights"
    assert method.artifacts["fptq_policy"]["weight_method"] == "gptq"


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs, match", [
    ({"v0": 150.0, "v1": 15.0}, "0 <= v0 < v1"),
    ({"v0": 15.0, "v1": 15.0}, "0 <= v0 < v1"),
    ({"v0": -1.0}, "0 <= v0 < v1"),
    ({"policy": "sometimes"}, "policy="),
    ({"middle": "awq"}, "middle="),
    ({"weight_method": "hqq"}, "weight_method="),
    ({"sq_alpha": 1.5}, "sq_alpha"),
    ({"kv_bits": 2}, "kv_bits"),
])
def test_fptq_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FPTQConfig(**kwargs)


@pytest.mark.parametrize("alpha", [-0.1, 1.01])
def test_smoothquant_alpha_error(alpha):
    with pytest.raises(ConfigError, match=r"alpha=.* must be in \[0, 1\]"):
        SmoothQuantConfig(w_bits=8, a_bits=8, alpha=alpha)


def test_unsupported_bits_have_reasons(outlier_model):
    _, spec = outlier_model
    assert "does not support w8a8" in build(FPTQConfig(w_bits=8, group_size=None)).check(spec)
    assert "does not support w4a16" in build(
        SmoothQuantConfig(w_bits=4, a_bits=16, group_size=G)).check(spec)
    assert build(SmoothQuantConfig(w_bits=4, a_bits=8, group_size=G)).check(spec) is None


# ------------------------------------------------------------------ report, plot, Hydra

def test_plot_policy_writes_png(fptq_run, tmp_path):
    rows = fptq_run[1].artifacts["fptq_policy"]["rows"]
    path = plot_policy(rows, tmp_path / "sub" / "policy.png", 15.0, 150.0)
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert not list(path.parent.glob("*.partial"))


def test_policy_plot_colours_each_strategy_as_the_data_spells_it(fptq_run):
    """One policy plot (the report and W&B draw methods.fptq.policy_figure too): every
    strategy a run records has its own colour, keyed by the recorded spelling."""
    from matplotlib.colors import to_rgba

    rows = fptq_run[1].artifacts["fptq_policy"]["rows"]
    strategies = {r["strategy"] for r in rows}
    assert strategies <= set(STRATEGY_COLOURS)
    assert len(set(STRATEGY_COLOURS.values())) == len(STRATEGY_COLOURS)
    fig = policy_figure(rows, {"v0": 15.0, "v1": 150.0})
    drawn = {}
    for coll in fig.axes[0].collections:
        label = coll.get_label()
        if ": " in label:
            drawn[label.split(": ", 1)[1]] = tuple(coll.get_facecolor()[0])
    assert set(drawn) == strategies
    for strategy, colour in drawn.items():
        assert colour == to_rgba(STRATEGY_COLOURS[strategy])


def test_hydra_fptq_run_records_policy_and_plot(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=fptq", "bits=w4a8",
                              "+model.source.kwargs.outliers={0.input_layernorm:40.0}"))
    assert rec.status == "ok", rec.error
    policy = rec.artifacts["fptq_policy"]
    assert len(policy["rows"]) == 14 and sum(policy["counts"]["bucket"].values()) == 14
    plot = rec.artifacts["fptq_policy_plot"]
    assert plot.endswith("fptq_policy.png")
    from pathlib import Path
    assert Path(plot).stat().st_size > 1000
    assert rec.metrics["ppl_ptb"] > 1
    assert rec.provenance["model_repr"] == {"FakeQuantLinear": 14}


def test_hydra_smoothquant_runs(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=smoothquant", "bits=w8a8"))
    assert rec.status == "ok", rec.error
    assert len(rec.artifacts["smoothquant"]["rows"]) == 14
    bad = run_one(compose_cfg(*TINY_QUICK, "method=smoothquant", "bits=w8a8",
                              "method.alpha=2.0"))
    assert bad.status == "skipped" and "alpha=2.0" in bad.error
