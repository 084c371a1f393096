"""Value checks shared by every kernel wrapper and reference (torch only).

A static activation scale s divides the activations: 0 gives inf codes clamped to +-127 and
an output multiplied by 0, NaN / inf / negative give silently wrong numbers. Every entry
point that takes one (ops.quantize_activations, the references, the Triton wrappers)
refuses such a value with a ValueError naming the argument.

Reading a CUDA tensor's value synchronizes the stream, so a tensor that passed is
remembered (an attribute holding its in-place version counter) and not read again: the runtime modules hand
the same buffer in on every call. Inside CUDA-graph capture nothing can be read; the check
then relies on the eager call that precedes every capture.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_CHECKED_ATTR = "_ptqbench_scale_checked_version"


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def static_scale(scale: float | Tensor, name: str, device: torch.device | str | None = None) -> Tensor:
    """scale (python number or 1-element tensor) -> fp32 0-d tensor on `device`, after
    checking that it is finite and > 0 (ValueError naming `name` otherwise)."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name} must be a scalar (per-tensor scale), got shape {tuple(scale.shape)}")
        if getattr(scale, _CHECKED_ATTR, None) != scale._version and not _capturing(scale):
            _require_positive_finite(float(scale.reshape(())), name)
            setattr(scale, _CHECKED_ATTR, scale._version)
        s = scale
    else:
        try:
            value = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(scale).__name__}") from None
        _require_positive_finite(value, name)
        s = torch.tensor(value)
    return s.to(device=device if device is not None else s.device, dtype=torch.float32).reshape(())


def _require_positive_finite(value: float, name: str) -> None:
    # fp32 is what the kernels divide by: a value that overflows or flushes to 0 there is bad too
    v32 = float(torch.tensor(value, dtype=torch.float32)) if math.isfinite(value) else value
    if not (math.isfinite(v32) and v32 > 0.0):
        raise ValueError(f"{name}={value!r} is not a valid static activation scale: it must be a "
                         "finite number > 0 (calibrate it, e.g. max|X| / 127, or use "
                         "act_mode='dynamic_token')")
