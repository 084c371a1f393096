"""Simulated KV-cache quantization, shared by every method (QuantConfig.kv_bits).

The cache holds K after RoPE (a per-position rotation inside each head that changes which
entries are largest) and V. Hooking k_proj / v_proj would quantize K before RoPE, so the
quantizer sits where Hugging Face attention receives the cached tensors: a registered
attention function (transformers AttentionInterface) that fake-quantizes K and V
[B, H_kv, T, d] and then calls the model's own attention (sdpa; eager falls back to sdpa).
Each attention module carries its quantizer as the child `kv_quant`.

Granularity (symmetric, b = kv_bits):
  per_token: one scale per (token, KV head), s = max_d |K| / (2^(b-1) - 1), dynamic;
  per_head:  one calibrated scale per KV head (max over the calibration tokens), static.
Fake-quant is idempotent, so re-quantizing the whole cache at every decode step stores the
same values as quantizing each entry once. Gradients pass by the straight-through
estimator (LLM-QAT trains through this quantizer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from methods.arch import ModelSpec
from methods.primitives import fake_quantize_ste, qrange

KV_GRANULARITIES = ("per_token", "per_head")
KV_BITS = (4, 8)
IMPL_PREFIX = "ptqbench_kv|"


class KVCacheQuantizer(nn.Module):
    """Fake-quant of one attention layer's cached K and V, each [B, H_kv, T, d]."""

    def __init__(self, bits: int, granularity: str, num_kv_heads: int, head_dim: int):
        super().__init__()
        if bits not in KV_BITS:
            raise ValueError(f"kv_bits={bits}; use one of {KV_BITS}")
        if granularity not in KV_GRANULARITIES:
            raise ValueError(f"kv_granularity={granularity!r}; use one of {KV_GRANULARITIES}")
        self.bits, self.granularity = bits, granularity
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.qmax = qrange(bits, True)[1]
        self.observing = False
        self.calls = 0                      # forwards that quantized (tests: it really ran)
        self.register_buffer("k_max", None)  # [H_kv] per_head: calibrated max|K|
        self.register_buffer("v_max", None)

    @property
    def calibrated(self) -> bool:
        return self.k_max is not None and self.v_max is not None

    def _scale(self, x: Tensor, head_max: Tensor | None) -> Tensor:
        if self.granularity == "per_token":
            return (x.detach().abs().amax(dim=-1, keepdim=True) / self.qmax).clamp_min(1e-8)
        if head_max is None:
            raise RuntimeError("per_head KV quantization is not calibrated: run "
                               "calibrate_kv_cache (method.quantize_kv_cache) first")
        return (head_max.to(x.dtype) / self.qmax).clamp_min(1e-8)[None, :, None, None]

    @staticmethod
    def _head_max(x: Tensor, old: Tensor | None) -> Tensor:
        m = x.detach().abs().float().amax(dim=(0, 2, 3))
        return m if old is None else torch.maximum(old, m)

    def forward(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.observing:
            self.k_max = self._head_max(key, self.k_max)
            self.v_max = self._head_max(value, self.v_max)
            return key, value
        self.calls += 1
        return (fake_quantize_ste(key, self._scale(key, self.k_max), self.bits),
                fake_quantize_ste(value, self._scale(value, self.v_max), self.bits))

    def extra_repr(self) -> str:
        return (f"int{self.bits} {self.granularity}, {self.num_kv_heads} KV heads x "
                f"{self.head_dim}")


# ------------------------------------------------------------------ attention function

def _base_attention(name: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return sdpa_attention_forward if name in ("eager", None) else ALL_ATTENTION_FUNCTIONS[name]


def _make_attention(base_name: str):
    base = _base_attention(base_name)

    def kv_quant_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, **kwargs: Any):
        kvq = getattr(module, "kv_quant", None)
        if isinstance(kvq, KVCacheQuantizer):
            key, value = kvq(key, value)
        return base(module, query, key, value, attention_mask, **kwargs)

    return kv_quant_attention


def register_attention(base_name: str) -> str:
    """Register `ptqbench_kv|<base>` (attention + mask function) once; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    mask_base = "sdpa" if base_name in ("eager", None) else base_name
    name = IMPL_PREFIX + mask_base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(mask_base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])
    return name


def _configs(model: nn.Module) -> Iterator[Any]:
    """Every distinct config object the model's modules read _attn_implementation from."""
    seen: set[int] = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            yield cfg


def attention_modules(model: nn.Module, spec: ModelSpec) -> list[nn.Module]:
    """The attention module of each block: the parent of the family's K projection."""
    k_name = spec.table.kv_linears[0]
    parent = k_name.rpartition(".")[0]
    return [block.get_submodule(parent) for block in spec.blocks(model)]


def attach_kv_cache_quant(model: nn.Module, spec: ModelSpec, bits: int,
                          granularity: str) -> list[KVCacheQuantizer]:
    """Give every attention module a fresh `kv_quant` and route attention through it."""
    detach_kv_cache_quant(model, spec)
    for cfg in _configs(model):
        cfg._attn_implementation = register_attention(cfg._attn_implementation)
    device = next(model.parameters()).device
    out = []
    for attn in attention_modules(model, spec):
        q = KVCacheQuantizer(bits, granularity, spec.num_kv_heads, spec.head_dim).to(device)
        attn.add_module("kv_quant", q)
        out.append(q)
    return out


def detach_kv_cache_quant(model: nn.Module, spec: ModelSpec) -> None:
    """Undo attach_kv_cache_quant (no-op when nothing is attached)."""
    for attn in attention_modules(model, spec):
        if isinstance(getattr(attn, "kv_quant", None), KVCacheQuantizer):
            del attn.kv_quant
    for cfg in _configs(model):
        impl = cfg._attn_implementation
        if isinstance(impl, str) and impl.startswith(IMPL_PREFIX):
            cfg._attn_implementation = impl[len(IMPL_PREFIX):]


def kv_quantizers(model: nn.Module) -> list[KVCacheQuantizer]:
    return [m for m in model.modules() if isinstance(m, KVCacheQuantizer)]


@torch.no_grad()
def calibrate_kv_cache(model: nn.Module, calib: Sequence[Tensor], max_samples: int) -> int:
    """per_head: max|K|, max|V| per KV head over up to max_samples calibration sequences
    (the quantized model's own K and V). Returns the number of tokens seen."""
    quantizers = kv_quantizers(model)
    device = next(model.parameters()).device
    tokens = 0
    for q in quantizers:
        q.observing, q.k_max, q.v_max = True, None, None
    try:
        for ids in list(calib)[:max_samples]:
            model(ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for q in quantizers:
            q.observing = False
    return tokens


def quantize_kv_cache(model: nn.Module, spec: ModelSpec, bits: int, granularity: str,
                      calib: Sequence[Tensor] | None, max_samples: int = 16) -> dict[str, Any]:
    """Attach (and for per_head calibrate) the KV quantizers; returns the record's summary."""
    qs = attach_kv_cache_quant(model, spec, bits, granularity)
    info: dict[str, Any] = {"bits": bits, "granularity": granularity, "layers": len(qs),
                            "applied_to": "K after RoPE, V (attention function)"}
    if granularity == "per_head":
        if not calib:
            raise ValueError("kv_granularity=per_head needs calibration data for its static "
                             "scales (set calib=...), or use kv_granularity=per_token")
        info["calib_tokens"] = calibrate_kv_cache(model, calib, max_samples)
        info["k_max"] = [round(float(q.k_max.max()), 4) for q in qs]
        info["v_max"] = [round(float(q.v_max.max()), 4) for q in qs]
    return info
