"""Evaluators: each is `evaluate(ctx, cfg) -> EvalResult`, looked up by name.

An eval config (conf/eval/*.yaml) lists `evaluators: [...]`; every evaluator reads its
options from the same eval config node. Evaluators never reload or re-quantize the
model: they get the exact in-memory model of the run through `EvalContext`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from methods.arch import ModelSpec

if TYPE_CHECKING:
    from methods.base import Method


@dataclass
class EvalContext:
    model: nn.Module              # the run's model exactly as quantized (never reloaded)
    tokenizer: Any
    spec: ModelSpec
    data_dir: Path | None
    run_dir: Path                 # per-run artifact directory (plots, tables)
    device: torch.device
    method: Method | None = None  # the method that quantized `model`; None: an fp model
    calib: list[Tensor] | None = None          # its calibration batches, when it used any
    reference_model: nn.Module | None = None   # fp copy taken before quantization, for eval
    #                                            configs with `needs_reference_model: true`

    @property
    def method_name(self) -> str:
        return self.method.name if self.method is not None else "fp16"


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)   # sub-task -> error, others ran


Evaluator = Callable[[EvalContext, Any], EvalResult]

# name -> "module:function"; imported lazily so an eval's heavy deps load only when used.
EVALUATORS: dict[str, str] = {
    "ppl": "harness.evals.ppl:evaluate",
    "lm_eval": "harness.evals.lm_eval:evaluate",
    "latency": "harness.evals.latency:evaluate",
    "distributions": "harness.evals.diagnostics:evaluate_distributions",
    "sensitivity": "harness.evals.diagnostics:evaluate_sensitivity",
}


def get_evaluator(name: str) -> Evaluator:
    try:
        target = EVALUATORS[name]
    except KeyError:
        raise ValueError(f"unknown evaluator {name!r}; available: {sorted(EVALUATORS)}") from None
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)
