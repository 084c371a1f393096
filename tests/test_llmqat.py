"""LLM-QAT on tiny-llama: STE, data-free generation, distillation, and the result is an
ordinary FakeQuantLinear model."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.inputs.models import tiny_llama
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from methods.base import ConfigError
from methods.catalog import build
from methods.checkpoint import load_runtime_checkpoint, save_runtime_checkpoint
from methods.layers import FakeQuantLinear
from methods.llmqat import (
    LLMQATConfig,
    generate_sequences,
    kl_to_teacher,
    load_or_generate,
    soft_cross_entropy,
)
from methods.primitives import (
    fake_quantize_per_token_ste,
    fake_quantize_ste,
    fake_quantize_weight,
    fake_quantize_weight_ste,
)
from tests.conftest import TINY_QUICK

SMALL = dict(n_samples=8, seq_len=24, gen_batch_size=4, greedy_tokens=3, steps=12,
             batch_size=2, lr=1e-4)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=1)
    return model, ModelSpec.from_model(model, "tiny")


def test_ste_passes_gradient_inside_and_clips_outside():
    s = torch.tensor(0.5)
    x = torch.tensor([-5.0, -4.0, -1.3, 0.2, 3.49, 3.6, 9.0], requires_grad=True)
    y = fake_quantize_ste(x, s, 4)          # grid [-8, 7] * 0.5 = [-4, 3.5]
    torch.testing.assert_close(y.detach(), torch.tensor([-4.0, -4.0, -1.5, 0.0, 3.5, 3.5, 3.5]))
    y.backward(torch.arange(1.0, 8.0))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]))


def test_ste_weight_and_token_grids_match_primitives():
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    for group in (None, 16):
        torch.testing.assert_close(fake_quantize_weight_ste(W, 4, group),
                                   fake_quantize_weight(W, 4, group))
    X = torch.randn(3, 5, 32, requires_grad=True)
    fake_quantize_per_token_ste(X, 8).sum().backward()
    torch.testing.assert_close(X.grad, torch.ones_like(X))   # MinMax: nothing clipped


def test_generation_greedy_prefix_and_cache(tiny, tmp_path):
    model, spec = tiny
    a = generate_sequences(model, 3, 12, 3, 1.0, 2, seed=5)
    b = generate_sequences(model, 3, 12, 3, 1.0, 3, seed=5)
    assert a.shape == (3, 12) and not set(a.flatten().tolist()) & {0, 1, 2}
    # tokens 2..4 are greedy: the argmax of the fp model given the prefix
    with torch.no_grad():
        logits = model(input_ids=a[:, :3]).logits[:, -1]
    logits[:, [0, 1, 2]] = float("-inf")
    torch.testing.assert_close(a[:, 3], logits.argmax(-1))
    torch.testing.assert_close(a[:, 0], b[:, 0])               # batching does not change seeds
    cfg = LLMQATConfig(**{**SMALL, "n_samples": 3, "seq_len": 12})
    d1, info1 = load_or_generate(model, "tiny", cfg, tmp_path)
    d2, info2 = load_or_generate(model, "tiny", cfg, tmp_path)
    assert not info1["cached"] and info2["cached"]
    torch.testing.assert_close(d1, d2)
    assert len(list((tmp_path / "llmqat_data").glob("*.pt"))) == 1


def test_training_lowers_kd_loss_and_gives_fake_quant_model(tiny, tmp_path):
    model, spec = tiny
    m = copy.deepcopy(model)
    method = build(LLMQATConfig(**SMALL, kv_bits=8))
    method.cache_dir = tmp_path
    method.quantize(m, spec, None)
    info = method.artifacts["llmqat"]
    assert len(info["kl_per_step"]) == 12 and info["tokens_trained"] == 12 * 2 * 24
    assert info["kl_after"] < 0.75 * info["kl_before"]
    lins = [m.get_submodule(f"model.layers.{i}.{n}") for i in range(spec.num_layers)
            for n in spec.table.linear_names()]
    assert all(isinstance(x, FakeQuantLinear) and x.w_bits == 4 and x.a_bits == 8
               and x.act_mode == "dynamic_token" and x.group_size is None for x in lins)
    assert not any(p.requires_grad for p in m.parameters())
    assert not hasattr(m.model.layers[0].self_attn, "kv_quant")   # the pipeline re-attaches
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    rt = method.to_runtime(copy.deepcopy(m), spec) if not method.config.kv_bits else None
    assert rt is None   # kv_bits set: the runtime path refuses (tested in test_kvcache)
    path = save_runtime_checkpoint(m, spec, tmp_path / "ckpt", {"method": method.describe()})
    back = load_runtime_checkpoint(path, copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref)
    png = method.write_artifacts(tmp_path / "run")["llmqat_loss_plot"]
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_trained_model_converts_to_runtime(tiny):
    model, spec = tiny
    m = copy.deepcopy(model)
    method = build(LLMQATConfig(**{**SMALL, "steps": 2}))
    method.quantize(m, spec, None)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sim = m(input_ids=ids).logits
        rt = method.to_runtime(copy.deepcopy(m), spec)(input_ids=ids).logits
    torch.testing.assert_close(rt, sim, atol=2e-3, rtol=2e-3)


def test_soft_cross_entropy_is_minimised_by_the_teacher():
    t = torch.randn(2, 5, 11)
    s = t + torch.randn_like(t)
    best = soft_cross_entropy(t, t)
    assert soft_cross_entropy(s, t) > best
    torch.testing.assert_close(best, -(t.softmax(-1) * t.log_softmax(-1)).sum(-1).mean())
    torch.testing.assert_close(kl_to_teacher(s, t), soft_cross_entropy(s, t) - best)
    assert float(kl_to_teacher(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"act_mode": "static_tensor"}, "per token"),
    ({"symmetric": False}, "symmetric"),
    ({"w_grid": "full"}, "w_grid"),
    ({"steps": 0}, "steps"),
    ({"greedy_tokens": 300}, "greedy_tokens"),
    ({"batch_size": 100}, "batch_size"),
    ({"lr": 0}, "lr"),
])
def test_llmqat_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LLMQATConfig(**kwargs)


def test_hydra_llmqat_record(compose_cfg):
    over = [f"++method.{k}={v}" for k, v in SMALL.items()]
    rec = run_one(compose_cfg(*TINY_QUICK, "method=llmqat", "bits=w4a8kv4", *over))
    assert rec.status == "ok", rec.error
    info = rec.artifacts["llmqat"]
    assert info["steps"] == 12 and info["train_time_s"] > 0 and not info["data"]["cached"]
    assert rec.artifacts["kv_cache"]["bits"] == 4
    assert rec.artifacts["llmqat_loss_plot"].endswith("llmqat_loss.png")
    assert rec.provenance["model_repr"] == {"FakeQuantLinear": 14}
    again = run_one(compose_cfg(*TINY_QUICK, "method=llmqat", "bits=w4a8", *over))
    assert again.status == "ok" and again.artifacts["llmqat"]["data"]["cached"]
