"""The full-precision baseline: the model unchanged (in the model's configured dtype)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.arch import ModelSpec
from methods.base import Calib, Method, QuantConfig, register


@dataclass(frozen=True)
class FP16Config(QuantConfig):
    pass


@register(FP16Config)
class FP16(Method[FP16Config]):
    name = "fp16"
    supported_bits = frozenset({(16, 16)})

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        return model

    def to_runtime(self, model: nn.Module, spec: ModelSpec) -> nn.Module:
        return model
