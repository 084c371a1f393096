"""Effective model size on disk with real packing, and average bits per weight.

Accounting (bits are stored densely packed, as a runtime checkpoint would):
  quantized block linear W [N, K] at b bits, groups of g along K (g = K per channel):
      codes      N * K * b            (int4: two per byte, int3: 3 bits packed, int8: a byte)
      scales     N * (K / g) * 16     (fp16)
      zeros      N * (K / g) * b      (asymmetric only; zero points live on the code grid)
      two-level (w_scales=two_level): scales N * (K / g) * 8 (integer s2) + N * 16 (fp16 s1)
  every other parameter (embeddings, lm_head, norms, biases, fp-kept linears): 16 bits
  static activation scale: 32 bits per linear; per-channel smoothing vector: K * 16 bits

avg_bits_linear = (codes + scales + zeros of the block linears) / (their weight elements)
avg_bits_per_weight = model bits / model parameters (every parameter counted once, tied
embeddings once). A pure function of the quantized model: what is counted is what the
modules hold, so any method that produces `FakeQuantLinear`s is measured the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from methods.arch import ModelSpec
from methods.base import QuantConfig
from methods.layers import FakeQuantLinear, iter_block_linears, precision_for

FP_BITS = 16
SCALE_BITS = 16
ACT_SCALE_BITS = 32


@dataclass(frozen=True)
class LinearSize:
    weights: int           # N * K
    weight_bits: int       # codes + scales + zeros (or 16 per weight when not quantized)
    extra_bits: int        # bias, activation scale, smoothing vector
    w_bits: int            # 16 when not quantized


def packed_bits(numel: int, bits: int) -> int:
    """Bits a tensor of `numel` b-bit codes takes when packed into whole bytes."""
    return 8 * math.ceil(numel * bits / 8)


def linear_size(module: nn.Module) -> LinearSize:
    weight = module.weight
    n, k = weight.shape
    extra = FP_BITS * module.bias.numel() if getattr(module, "bias", None) is not None else 0
    if not isinstance(module, FakeQuantLinear) or module.w_bits >= 16:
        bits = FP_BITS * n * k
        w_bits = FP_BITS
    else:
        w_bits = module.w_bits
        groups = module.w_scale.shape[-1] if module.w_scale is not None else 1
        if module.w_scale2 is not None:   # two-level: uint8 group scales, fp16 channel scales
            bits = packed_bits(n * k, w_bits) + 8 * n * groups + SCALE_BITS * n
        else:
            bits = packed_bits(n * k, w_bits) + SCALE_BITS * n * groups
        if module.w_zero is not None:
            bits += packed_bits(n * groups, w_bits)
    if isinstance(module, FakeQuantLinear):
        if module.act_scale is not None:
            extra += ACT_SCALE_BITS
        if module.smooth_inv is not None:
            extra += FP_BITS * module.smooth_inv.numel()
    return LinearSize(n * k, bits, extra, w_bits)


@dataclass
class ModelSize:
    model_size_bytes: int
    avg_bits_per_weight: float
    avg_bits_linear: float
    n_params: int
    linear_weights: int
    linears_by_bits: dict[str, int] = field(default_factory=dict)
    kept_fp: list[str] = field(default_factory=list)
    kept_w8: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"model_size_bytes": self.model_size_bytes,
                "avg_bits_per_weight": self.avg_bits_per_weight,
                "avg_bits_linear": self.avg_bits_linear}

    def mixed_precision(self) -> dict[str, Any]:
        return {"kept_fp": self.kept_fp, "kept_w8": self.kept_w8,
                "linears_by_w_bits": self.linears_by_bits}


def model_size(model: nn.Module, spec: ModelSpec, config: QuantConfig) -> ModelSize:
    """Size of `model` as it would be stored, and which block linears `config` kept."""
    block_linears = {full: mod for _, _, full, mod in iter_block_linears(model, spec)}
    counted: set[int] = set()
    total_bits = linear_bits = linear_weights = 0
    by_bits: dict[str, int] = {}
    for mod in block_linears.values():
        s = linear_size(mod)
        total_bits += s.weight_bits + s.extra_bits
        linear_bits += s.weight_bits
        linear_weights += s.weights
        by_bits[f"w{s.w_bits}"] = by_bits.get(f"w{s.w_bits}", 0) + 1
        counted.update(id(p) for p in mod.parameters(recurse=False))
    for mod in model.modules():
        if isinstance(mod, FakeQuantLinear) and id(mod.weight) not in counted:
            s = linear_size(mod)          # e.g. a quantized lm_head
            total_bits += s.weight_bits + s.extra_bits
            counted.update(id(p) for p in mod.parameters(recurse=False))
    n_params = 0
    for p in model.parameters():          # deduplicated: tied embeddings count once
        n_params += p.numel()
        if id(p) not in counted:
            total_bits += FP_BITS * p.numel()
    return ModelSize(
        model_size_bytes=math.ceil(total_bits / 8),
        avg_bits_per_weight=total_bits / n_params,
        avg_bits_linear=linear_bits / linear_weights if linear_weights else float(FP_BITS),
        n_params=n_params, linear_weights=linear_weights, linears_by_bits=by_bits,
        kept_fp=[n for n in block_linears if precision_for(config, n) == "fp"],
        kept_w8=[n for n in block_linears if precision_for(config, n) == "w8"],
    )
