"""Conversion of a simulated (fake-quant) model into runtime modules with packed weights.
Filled in with the kernels (W4A8Linear / W8A8Linear)."""

from __future__ import annotations

from torch import nn

from methods.arch import ModelSpec


def convert_to_runtime(model: nn.Module, spec: ModelSpec) -> nn.Module:
    raise NotImplementedError("runtime conversion is not available yet")
