"""KV-cache quantization, the shared setting of every method (methods/kvcache.py).

Every test here fails when the quantizer is never attached (or never runs): outputs are
compared with an independent reference that quantizes K after RoPE, and with the fp model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness.inputs.models import tiny_llama
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from methods.base import ConfigError, QuantConfig
from methods.catalog import build
from methods.kvcache import KVCacheQuantizer, detach_kv_cache_quant, kv_quantizers
from methods.primitives import fake_quantize
from methods.rtn import RTNConfig
from tests.conftest import TINY_QUICK

G = 32


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=3)
    return model, ModelSpec.from_model(model, "tiny")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(7))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _attention_reference(model, spec, x, bits, after_rope: bool):
    """Block 0's attention output for its input x [B, T, C], computed by hand: K and V
    fake-quantized per (token, head) after RoPE (or, for the wrong variant, before it)."""
    attn = model.model.layers[0].self_attn
    B, T, _ = x.shape
    d = spec.head_dim

    def heads(y, n):
        return y.view(B, T, n, d).transpose(1, 2)          # [B, n, T, d]

    def q(y):
        return fake_quantize(y, bits, True, "per_token")

    Q = heads(attn.q_proj(x), spec.num_heads)
    K = heads(attn.k_proj(x), spec.num_kv_heads)
    V = q(heads(attn.v_proj(x), spec.num_kv_heads))
    if not after_rope:
        K = q(K)
    pos = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    cos, sin = cos[:, None], sin[:, None]
    Q, K = Q * cos + _rotate_half(Q) * sin, K * cos + _rotate_half(K) * sin
    if after_rope:
        K = q(K)
    rep = spec.kv_repeat
    K, V = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(Q, K, V, is_causal=True)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _block0_attention(model, ids):
    """(input, output) of block 0's self-attention in a full forward."""
    seen = {}
    attn = model.model.layers[0].self_attn

    def pre(mod, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def post(mod, args, out):
        seen["y"] = out[0]

    h1 = attn.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = attn.register_forward_hook(post)
    try:
        _logits(model, ids)
    finally:
        h1.remove()
        h2.remove()
    return seen["x"], seen["y"]


def test_kv_quantized_after_rope_matches_hand_reference(tiny, ids):
    model, spec = tiny
    m = copy.deepcopy(model)
    method = build(RTNConfig(w_bits=16, a_bits=16, kv_bits=4))
    method.quantize_kv_cache(m, spec, None)
    x, y = _block0_attention(m, ids)
    with torch.no_grad():
        after = _attention_reference(m, spec, x, 4, after_rope=True)
        before = _attention_reference(m, spec, x, 4, after_rope=False)
        fp = _block0_attention(model, ids)[1]
    torch.testing.assert_close(y, after, atol=2e-5, rtol=1e-4)
    # the quantizer is attached and is not a hook on k_proj (that would quantize before RoPE)
    assert (y - fp).abs().max() > 1e-3
    assert (y - before).abs().max() > 1e-3
    assert all(q.calls > 0 for q in kv_quantizers(m))
    assert method.artifacts["kv_cache"]["bits"] == 4


def test_kv_bits_order_and_detach(tiny, ids):
    model, spec = tiny
    ref = _logits(model, ids)
    errs = {}
    for bits in (8, 4):
        m = copy.deepcopy(model)
        build(RTNConfig(w_bits=16, a_bits=16, kv_bits=bits)).quantize_kv_cache(m, spec, None)
        errs[bits] = float((_logits(m, ids) - ref).pow(2).mean())
        assert len(kv_quantizers(m)) == spec.num_layers
    assert 0 < errs[8] < errs[4]
    detach_kv_cache_quant(m, spec)
    assert not kv_quantizers(m) and m.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(m, ids), ref)


def test_decode_with_cache_equals_full_forward(tiny, ids):
    """The cached (quantized) K and V give the same next-token logits as one full forward:
    the generation path really reads a quantized cache."""
    model, spec = tiny
    m = copy.deepcopy(model)
    build(RTNConfig(w_bits=16, a_bits=16, kv_bits=4)).quantize_kv_cache(m, spec, None)
    seq = ids[:1]
    with torch.no_grad():
        out = m(input_ids=seq[:, :16], use_cache=True)
        cache, steps = out.past_key_values, []
        for t in range(16, seq.shape[1]):
            out = m(input_ids=seq[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    full = _logits(m, seq)[:, 16:]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)
    fp = _logits(model, seq)[:, 16:]
    assert (full - fp).abs().max() > 1e-3


def test_per_head_calibrated_scales(tiny, ids):
    model, spec = tiny
    m = copy.deepcopy(model)
    method = build(RTNConfig(w_bits=16, a_bits=16, kv_bits=8, kv_granularity="per_head"))
    assert method.needs_kv_calibration
    with pytest.raises(ValueError, match="calibration"):
        method.quantize_kv_cache(copy.deepcopy(model), spec, None)
    method.quantize_kv_cache(m, spec, [ids[:1], ids[1:]])
    for q in kv_quantizers(m):
        assert q.k_max.shape == (spec.num_kv_heads,) and q.calibrated
    info = method.artifacts["kv_cache"]
    assert info["granularity"] == "per_head" and info["calib_tokens"] == ids.numel()
    assert (_logits(m, ids) - _logits(model, ids)).abs().max() > 1e-4


CONFIGS = {
    "rtn": lambda: RTNConfig(w_bits=4, a_bits=8, group_size=G, kv_bits=8),
    "smoothquant": lambda: __import__("methods.smoothquant", fromlist=["x"]).SmoothQuantConfig(
        w_bits=8, a_bits=8, kv_bits=8),
    "gptq": lambda: __import__("methods.gptq", fromlist=["x"]).GPTQConfig(
        w_bits=4, group_size=G, kv_bits=8),
    "awq": lambda: __import__("methods.awq", fromlist=["x"]).AWQConfig(
        w_bits=4, group_size=G, kv_bits=8, n_grid=4, clip=False),
    "fptq": lambda: __import__("methods.fptq", fromlist=["x"]).FPTQConfig(
        group_size=G, kv_bits=8, kv_granularity="per_head"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_method_carries_the_kv_setting(name, tiny, ids):
    model, spec = tiny
    m = copy.deepcopy(model)
    method = build(CONFIGS[name]())
    calib = [ids[:1], ids[1:]]
    method.quantize(m, spec, calib)
    without = _logits(m, ids)
    method.quantize_kv_cache(m, spec, calib)
    qs = kv_quantizers(m)
    assert len(qs) == spec.num_layers
    assert (_logits(m, ids) - without).abs().max() > 0
    assert all(q.calls > 0 for q in qs)
    with pytest.raises(ValueError, match="runtime=false"):
        method.to_runtime(m, spec)


def test_kv_config_validation():
    assert QuantConfig(kv_bits=16).kv_bits is None
    assert RTNConfig(w_bits=4, a_bits=8, kv_bits=4).bits_label == "w4a8kv4"
    with pytest.raises(ConfigError, match="kv_bits=3"):
        QuantConfig(kv_bits=3)
    with pytest.raises(ConfigError, match="kv_granularity"):
        QuantConfig(kv_bits=8, kv_granularity="per_channel")
    with pytest.raises(ValueError, match="kv_bits"):
        KVCacheQuantizer(2, "per_token", 2, 16)


def test_hydra_w4a8kv4_record(compose_cfg):
    base = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a8"))
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a8kv4"))
    assert base.status == rec.status == "ok", rec.error
    assert rec.config["method"]["kv_bits"] == 4 and base.config["method"]["kv_bits"] is None
    assert rec.artifacts["kv_cache"]["granularity"] == "per_token"
    assert rec.metrics["ppl_ptb"] != base.metrics["ppl_ptb"]
    assert "quantize_kv_cache" in rec.timings
