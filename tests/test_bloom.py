"""The BLOOM family table on a tiny random BLOOM built in code: spec, exact smoothing folds
into LayerNorm weight and bias, and every method run through the real Hydra configs (or
skipped with its reason)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from harness.inputs.models import tiny_bloom
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from methods.blockwise import _block_output, capture_block_inputs
from methods.smoothing import fold_group_scale

QUICK = ["model=tiny-bloom", "calib=random-tokens", "calib.n_samples=2", "calib.seqlen=32",
         "eval=ppl-quick", "eval.max_windows=1", "eval.seqlen=64", "eval.datasets=[ptb]"]


@pytest.fixture(scope="module")
def bloom():
    model = tiny_bloom(outliers={"0.post_attention_layernorm": 40.0})
    return model, ModelSpec.from_model(model, "tiny-bloom")


def test_bloom_spec(bloom):
    _, spec = bloom
    assert spec.table.family == "bloom" and spec.table.norm_kind == "layernorm"
    assert (spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads) == (
        64, 256, 4, 4)
    assert spec.in_features == {"self_attention.query_key_value": 64,
                                "self_attention.dense": 64, "mlp.dense_h_to_4h": 64,
                                "mlp.dense_4h_to_h": 256}


@pytest.mark.parametrize("role", ["qkv", "fc1"])
def test_smoothing_folds_into_layernorm_weight_and_bias_exactly(bloom, role):
    model, spec = bloom
    model = copy.deepcopy(model)
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, spec, [ids])
    block = spec.blocks(model)[0]
    x, kw = next(iter(inputs.samples()))
    with torch.no_grad():
        ref = _block_output(block(x, **kw))
    group = next(g for g in spec.table.groups if g.role == role)
    norm = block.get_submodule(group.feeder)
    bias_before = norm.bias.detach().clone()
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 4 + 0.25
    assert fold_group_scale(block, group, s, spec, allow_linear_feeders=True)
    assert_close(norm.bias.detach(), bias_before / s)
    with torch.no_grad():
        out = _block_output(block(x, **kw))
    assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,bits", [("rtn", "w4a8"), ("smoothquant", "w8a8"),
                                         ("gptq", "w4a16"), ("awq", "w4a16"),
                                         ("fptq", "w4a8"), ("quip", "w2a16"),
                                         ("llmc_gptq", "w4a16"), ("llmc_smoothquant", "w8a8")])
def test_every_method_runs_on_bloom(compose_cfg, method, bits):
    if method.startswith("llmc_"):
        pytest.importorskip("llmcompressor")
    rec = run_one(compose_cfg(*QUICK, f"method={method}", f"bits={bits}"))
    assert rec.status == "ok", rec.error
    assert rec.metrics["ppl_ptb"] > 1
    assert sum(rec.provenance["model_repr"].values()) == 8        # 2 blocks x 4 linears


@pytest.mark.parametrize("method,bits,why", [("quarot", "w4a8", "LayerNorm"),
                                             ("fptq", "w4a8", "kv"),
                                             ("llmc_awq", "w4a16", "gelu_impl")])
def test_methods_bloom_cannot_run_are_skipped_with_reason(compose_cfg, method, bits, why):
    if method.startswith("llmc_"):
        pytest.importorskip("llmcompressor")
    extra = ["method.kv_bits=8"] if why == "kv" else []
    rec = run_one(compose_cfg(*QUICK, f"method={method}", f"bits={bits}", *extra))
    assert rec.status == "skipped" and why.lower() in rec.error.lower(), rec.error
