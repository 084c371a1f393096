"""Evaluators: each is `evaluate(ctx, cfg) -> EvalResult`, looked up by name.

An eval config (conf/eval/*.yaml) lists `evaluators: [...]`; every evaluator reads its
options from the same eval config node. Each evaluator module also says what its metrics
mean (`metric_info(name) -> MetricInfo | None`: label, unit, direction, stderr key, which
report table): the report asks `harness.evals.metric_info` and never parses names itself.
Evaluators never reload the model: they get the exact in-memory model of the run through
`EvalContext`. The one that re-quantizes (the sensitivity diagnostic, on a copy of the fp
model) does it through `Method.quantize_only`.
"""

from __future__ import annotations

import functools
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
    placement: str = "device"     # "offload" / "disk": weights in host memory / in files,
    #                               blocks onloaded one at a time (harness.inputs.placement)
    device_budget_bytes: int | None = None   # per-GPU budget for lm-eval's device map

    @property
    def blockwise(self) -> bool:
        """The model's blocks are onloaded one at a time (offload or disk placement)."""
        return self.placement in ("offload", "disk")

    @property
    def method_name(self) -> str:
        return self.method.name if self.method is not None else "fp16"


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)   # sub-task -> error, others ran


@dataclass(frozen=True)
class MetricInfo:
    """What one recorded metric means, declared by the evaluator that makes it."""
    evaluator: str
    table: str                     # report section: perplexity | accuracy | mmlu | latency ...
    label: str                     # column label, e.g. "WikiText-2", "arc_easy", "TTFT p16 (ms)"
    unit: str = ""                 # of the displayed value ("%" after `scale`)
    higher_is_better: bool = False
    stderr: str | None = None      # record key of its standard error, when it has one
    scale: float = 1.0             # display factor (lm-eval fractions -> percent)
    digits: int = 2
    kind: str = ""                 # the quantity: e.g. acc / acc_norm, latency_prefill_ms
    subject: str = ""              # dataset / task / category / latency column it measures
    order: tuple = ()              # position within its table (papers' column order)
    batch: int | None = None       # latency: the batch size (one table row per batch)


Evaluator = Callable[[EvalContext, Any], EvalResult]

# name -> "module:function"; imported lazily so an eval's heavy deps load only when used.
EVALUATORS: dict[str, str] = {
    "ppl": "harness.evals.ppl:evaluate",
    "lm_eval": "harness.evals.lm_eval:evaluate",
    "latency": "harness.evals.latency:evaluate",
    "distributions": "harness.evals.diagnostics:evaluate_distributions",
    "sensitivity": "harness.evals.diagnostics:evaluate_sensitivity",
}


# evaluator -> "module:function" describing its metric names (disjoint across evaluators).
METRIC_INFO: dict[str, str] = {
    "ppl": "harness.evals.ppl:metric_info",
    "lm_eval": "harness.evals.lm_eval:metric_info",
    "latency": "harness.evals.latency:metric_info",
    "sensitivity": "harness.evals.diagnostics:sensitivity_metric_info",
    "distributions": "harness.evals.diagnostics:distribution_metric_info",
}


@functools.cache
def metric_info(name: str) -> MetricInfo | None:
    """The meaning of a recorded metric, from the evaluator that names it; None for metrics
    no evaluator makes (pipeline timings, sizes) and for stderr entries."""
    for target in METRIC_INFO.values():
        module, _, fn = target.partition(":")
        info = getattr(importlib.import_module(module), fn)(name)
        if info is not None:
            return info
    return None


def get_evaluator(name: str) -> Evaluator:
    try:
        target = EVALUATORS[name]
    except KeyError:
        raise ValueError(f"unknown evaluator {name!r}; available: {sorted(EVALUATORS)}") from None
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)
