"""Diagnostics on tiny-llama: sensitivity ranking, mixed precision, size accounting,
distributions and the Hydra runs of both evaluators."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from harness.evals import EvalContext
from harness.evals.diagnostics import evaluate_sensitivity, sensitivity_groups
from harness.inputs.models import tiny_llama, tiny_tokenizer
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from methods.base import matches_any
from methods.catalog import build
from methods.layers import FakeQuantLinear, precision_for
from methods.rtn import RTNConfig
from methods.size import model_size

TINY_DIAG = ["model=tiny-llama", "calib=random-tokens", "eval.seqlen=64", "eval.max_windows=1"]
W4A8 = {"w_bits": 4, "a_bits": 8, "group_size": 32}
DOWN_1 = "model.layers.1.mlp.down_proj"


def calib_tokens(n: int = 4, seqlen: int = 64) -> list[torch.Tensor]:
    return list(torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(0))
                .split(1))


def quantized(cfg: RTNConfig, ref: nn.Module | None = None) -> tuple[nn.Module, nn.Module]:
    ref = ref if ref is not None else tiny_llama()
    spec = ModelSpec.from_model(ref, "tiny")
    return ref, build(cfg).quantize(copy.deepcopy(ref), spec, calib_tokens())


def hidden_outlier_llama(gain: float = 300.0) -> nn.Module:
    """tiny-llama whose block-1 down_proj input has two channels `gain` times larger, with
    down_proj's matching columns divided by `gain`: the fp function is unchanged (like a
    real LLM's massive activations) but a static per-tensor int8 scale for that input is
    set by the outliers and rounds every ordinary channel to zero."""
    model = tiny_llama()
    mlp, idx = model.model.layers[1].mlp, torch.tensor([5, 77])
    with torch.no_grad():
        mlp.up_proj.weight[idx] *= gain
        mlp.down_proj.weight[:, idx] /= gain
    return model


def test_outlier_down_proj_is_ranked_most_sensitive(tmp_path):
    ref = hidden_outlier_llama()
    cfg = RTNConfig(**W4A8)
    spec = ModelSpec.from_model(ref, "tiny")
    method = build(cfg)
    calib = calib_tokens()
    model = method.quantize(copy.deepcopy(ref), spec, calib)
    ctx = EvalContext(model=model, tokenizer=tiny_tokenizer(), spec=spec, data_dir=None,
                      run_dir=tmp_path, device=torch.device("cpu"), method=method,
                      calib=calib, reference_model=ref)
    ecfg = OmegaConf.create({"dataset": "ptb", "seqlen": 64, "max_windows": 1,
                             "groups": ["block", "type", "sublayer"]})
    res = evaluate_sensitivity(ctx, ecfg)
    table = res.artifacts["sensitivity"]
    top = {kind: next(r["group"] for r in table if r["kind"] == kind)
           for kind in ("block", "type", "sublayer")}
    assert top == {"block": "block_1", "type": "down", "sublayer": "mlp"}
    assert table[0]["rank"] == 1 and table[0]["delta_ppl"] == max(r["delta_ppl"] for r in table)
    assert res.metrics["sens_down"] > res.metrics["sens_gate_up"]
    assert res.metrics["sens_kl_down"] > res.metrics["sens_kl_qkv"]
    assert Path(res.artifacts["sensitivity_plot"]).is_file()


def test_sensitivity_groups_come_from_the_family_table():
    model = tiny_llama()
    groups = {g.name: g for g in sensitivity_groups(model, ModelSpec.from_model(model, "t"))}
    assert sorted(groups) == ["attn", "block_0", "block_1", "down", "gate_up", "mlp", "o", "qkv"]
    assert groups["block_1"].members[0].startswith("model.layers.1.")
    assert len(groups["block_1"].members) == 7
    assert groups["down"].members == ("model.layers.0.mlp.down_proj", DOWN_1)
    assert len(groups["attn"].members) == 8 and len(groups["mlp"].members) == 6


def test_keep_fp_pattern_semantics():
    assert matches_any(DOWN_1, ["mlp.down_proj"])                 # dotted suffix
    assert matches_any(DOWN_1, ["1.mlp.down_proj"])
    assert not matches_any(DOWN_1, ["down_pro"])                  # suffix only at a dot
    assert not matches_any("model.layers.11.mlp.down_proj", ["1.mlp.down_proj"])
    assert matches_any(DOWN_1, ["model.layers.1.*"])              # fnmatch, * crosses dots
    assert matches_any(DOWN_1, ["*.down_proj"])
    assert not matches_any("model.layers.1.mlp.up_proj", ["model.layers.[02].*"])
    cfg = RTNConfig(**W4A8, keep_fp=("mlp.down_proj",), keep_w8=("model.layers.1.*",))
    assert precision_for(cfg, DOWN_1) == "fp"                     # keep_fp wins over keep_w8
    assert precision_for(cfg, "model.layers.1.mlp.up_proj") == "w8"
    assert precision_for(cfg, "model.layers.0.mlp.up_proj") == "default"


def test_keep_fp_gives_exact_fp_outputs():
    ref, q = quantized(RTNConfig(**W4A8, keep_fp=("1.mlp.down_proj",)))
    kept, fp = q.get_submodule(DOWN_1), ref.get_submodule(DOWN_1)
    assert type(kept) is nn.Linear
    x = torch.randn(3, 17, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kept(x), fp(x))
    other = q.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(other, FakeQuantLinear) and other.w_bits == 4
    assert not torch.equal(other(x), ref.get_submodule("model.layers.0.mlp.down_proj")(x))


def test_keep_w8_gives_8bit_per_channel_weights():
    ref, q = quantized(RTNConfig(**W4A8, keep_w8=("*.down_proj",)))
    for i in (0, 1):
        mod = q.get_submodule(f"model.layers.{i}.mlp.down_proj")
        assert mod.w_bits == 8 and mod.group_size is None and mod.a_bits == 8
        assert mod.w_scale.shape == (64, 1)
        codes = mod.weight / mod.w_scale
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
        assert codes.abs().max() <= 128 and codes.round().unique().numel() > 16
        W = ref.get_submodule(f"model.layers.{i}.mlp.down_proj").weight
        torch.testing.assert_close(mod.w_scale[:, 0], W.abs().amax(dim=1) / 127)
    up = q.get_submodule("model.layers.1.mlp.up_proj")
    assert up.w_bits == 4 and up.w_scale.shape == (128, 2)


def test_size_accounting_matches_hand_computation():
    # tiny-llama: hidden 64, FFN 128, 2 blocks, 4 heads of 16 with 2 KV heads, vocab 320.
    # Block linears (N x K): q 64x64, k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64,
    # down 64x128 -> 4096+2048+2048+4096+8192+8192+8192 = 36,864 weights per block, 73,728.
    # Other parameters: embed 320x64 + lm_head 320x64 (untied) + 2x2 norms of 64 + final
    # norm 64 = 20,480 + 20,480 + 320 = 41,280, at 16 bits = 82,560 bytes.
    ref, q = quantized(RTNConfig(**W4A8))
    spec = ModelSpec.from_model(q, "tiny")
    codes = 73_728 * 4 // 8                   # int4, two per byte: 36,864 bytes
    scales = 73_728 // 32 * 2                 # one fp16 scale per 32 weights: 4,608 bytes
    act_scales = 14 * 4                       # static per-tensor fp32 scale per linear: 56
    size = model_size(q, spec, RTNConfig(**W4A8))
    assert size.model_size_bytes == 82_560 + codes + scales + act_scales == 124_088
    assert size.avg_bits_linear == 4 + 16 / 32
    assert size.avg_bits_per_weight == pytest.approx(124_088 * 8 / (73_728 + 41_280))
    assert size.n_params == 73_728 + 41_280

    # Mixed: block-1 down_proj (64x128 = 8,192 weights) in fp16, every q_proj (2 x 64x64)
    # at w8 per channel (one fp16 scale per row), the rest w4 g32.
    cfg = RTNConfig(**W4A8, keep_fp=(DOWN_1,), keep_w8=("self_attn.q_proj",))
    _, q = quantized(cfg, ref)
    size = model_size(q, spec, cfg)
    w4 = 73_728 - 8_192 - 2 * 4_096
    linear_bytes = (w4 // 2 + w4 // 32 * 2            # w4 codes + g32 scales
                    + 2 * (4_096 + 64 * 2)            # q_proj: int8 codes + per-row scales
                    + 8_192 * 2)                      # kept down_proj at 16 bits
    assert size.model_size_bytes == 82_560 + linear_bytes + 13 * 4
    assert size.avg_bits_linear == linear_bytes * 8 / 73_728
    assert size.kept_fp == [DOWN_1]
    assert size.kept_w8 == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert size.linears_by_bits == {"w8": 2, "w4": 11, "w16": 1}


def test_asymmetric_zero_points_are_counted_at_w_bits():
    cfg = RTNConfig(w_bits=4, a_bits=16, group_size=32, symmetric=False)
    _, q = quantized(cfg)
    size = model_size(q, ModelSpec.from_model(q, "tiny"), cfg)
    groups = 73_728 // 32
    assert size.model_size_bytes == 82_560 + 73_728 // 2 + groups * 2 + groups // 2
    assert size.avg_bits_linear == 4 + 16 / 32 + 4 / 32


def test_distributions_eval_writes_table_and_plots(compose_cfg):
    rec = run_one(compose_cfg(*TINY_DIAG, "method=rtn", "bits=w4a8", "method.act_mode=static_tensor", "eval=distributions"))
    assert rec.status == "ok", rec.error
    rows = rec.artifacts["distributions"]
    assert len(rows) == 14 and {"sqnr_w_db", "sqnr_x_db", "x_kurtosis", "x_top_channels",
                                "w_p99_9", "x_p99_9"} <= set(rows[0])
    assert 10 < rec.metrics["sqnr_w_min_db"] <= rec.metrics["sqnr_w_mean_db"] < 40
    assert rec.metrics["sqnr_x_min_db"] > 0 and rec.metrics["kurtosis_x_max"] > 1
    plots = rec.artifacts["distributions_plots"]
    assert set(plots) == {"activation_heatmap", "worst_histograms"}
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in plots.values())
    assert rec.metrics["model_size_bytes"] == 124_088 and rec.metrics["avg_bits_linear"] == 4.5


def test_sensitivity_run_then_keep_top_k_sensitive(compose_cfg):
    cfg = compose_cfg(*TINY_DIAG, "method=rtn", "bits=w4a8", "method.act_mode=static_tensor", "eval=sensitivity",
                      "eval.groups=[block,type]")
    rec = run_one(cfg)
    assert rec.status == "ok", rec.error
    table = rec.artifacts["sensitivity"]
    assert [r["rank"] for r in table] == list(range(1, 7))
    assert {f"sens_{r['group']}" for r in table} <= set(rec.metrics)
    assert rec.provenance["eval"]["sensitivity"]["recalibrated_per_group"] is True
    assert Path(rec.artifacts["sensitivity_plot"]).is_file()
    worst_block = next(r for r in table if r["kind"] == "block")

    path = Path(cfg.paths.runs_dir) / f"{rec.run_id}.json"
    mixed = run_one(compose_cfg(*TINY_DIAG, "method=rtn", "bits=w4a8", "method.act_mode=static_tensor", "eval=ppl-quick",
                                "eval.datasets=[ptb]", "method.keep_top_k_sensitive=1",
                                f"method.sensitivity_from={path}"))
    assert mixed.status == "ok", mixed.error
    mp = mixed.provenance["mixed_precision"]
    assert mp["selection"]["groups"] == [worst_block["group"]]
    assert mp["keep_fp"] == worst_block["patterns"] and len(mp["kept_fp"]) == 7
    assert mixed.metrics["avg_bits_linear"] > 4.5
    assert mixed.provenance["model_repr"] == {"Linear": 7, "FakeQuantLinear": 7}


def test_keep_top_k_without_record_fails_with_instructions(compose_cfg):
    rec = run_one(compose_cfg(*TINY_DIAG, "method=rtn", "bits=w4a16", "eval=ppl-quick",
                              "eval.datasets=[ptb]", "method.keep_top_k_sensitive=2"))
    assert rec.status == "failed" and "method.sensitivity_from" in rec.error
    rec = run_one(compose_cfg(*TINY_DIAG, "method=rtn", "bits=w4a16", "eval=ppl-quick",
                              "eval.datasets=[ptb]", "method.keep_top_k_sensitive=2",
                              "method.sensitivity_from=nosuchrun"))
    assert rec.status == "failed" and "nosuchrun" in rec.error


def test_record_json_carries_size_metrics(compose_cfg):
    cfg = compose_cfg(*TINY_DIAG, "method=rtn", "bits=w8a16", "eval=ppl-quick",
                      "eval.datasets=[ptb]", "method.keep_w8=[]")
    rec = run_one(cfg)
    data = json.loads((Path(cfg.paths.runs_dir) / f"{rec.run_id}.json").read_text())
    # w8a16 is per channel: one fp16 scale per output row; 2 x (64+32+32+64+128+128+64) rows
    assert data["metrics"]["avg_bits_linear"] == 8 + 16 * 1_024 / 73_728
    assert data["provenance"]["mixed_precision"]["linears_by_w_bits"] == {"w8": 14}
