"""Where a model's weights live and where its blocks compute.

    model.placement = auto | device | offload        (default auto)
    placement.device_memory_gb = <float> | null          (null: the device's free memory)

`device`: the whole model on the compute device (today's path). `offload`: the weights stay
in host memory and one decoder block at a time is moved to the compute device by the
block-wise engine (methods.blockwise), for calibration and for perplexity; embeddings and
the head visit the device only for their own step. `disk`: not even host memory holds the
blocks: each is read from its safetensors files when its turn comes and a quantized block
is written back to a work directory (harness.inputs.lazy), for models beyond RAM. `auto` is `device` when the model fits
the budget and `offload` otherwise. The record's `model_info.placement` says which ran.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from methods.arch import ModelSpec

PlacementMode = Literal["auto", "device", "offload", "disk"]
PLACEMENT_MODES = ("auto", "device", "offload", "disk")
DEFAULT_PLACEMENT: PlacementMode = "auto"
# Room kept free on the device for activations, Hessians and the allocator (fraction).
DEVICE_HEADROOM = 0.1


class PlacementError(ValueError):
    """The model (or one block of it) cannot be placed within the device budget."""


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (meta tensors count by shape and dtype)."""
    return sum(t.numel() * t.element_size()
               for t in [*module.parameters(), *module.buffers()])


@dataclass(frozen=True)
class Placement:
    mode: str                 # the setting
    path: str                 # what runs: "device" | "offload"
    compute_device: str
    budget_bytes: int | None  # None: unlimited (CPU compute)
    model_bytes: int
    largest_block_bytes: int
    head_bytes: int           # embeddings + final norm + lm_head (visit the device together)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def device_budget(device: torch.device, budget_gb: float | None) -> int | None:
    """Bytes the model may occupy on `device`: the setting, else the device's free memory
    less headroom (CUDA), else unlimited (CPU computes in host memory)."""
    if budget_gb is not None:
        try:
            budget_gb = float(budget_gb)
        except (TypeError, ValueError):
            raise PlacementError(f"placement.device_memory_gb={budget_gb!r}: a number of GiB "
                                 "> 0, or null for the device's free memory") from None
        if budget_gb <= 0:
            raise PlacementError(f"placement.device_memory_gb={budget_gb}: must be > 0 "
                                 "(or null for the device's free memory)")
        return int(budget_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (1 - DEVICE_HEADROOM))
    return None


def plan_placement(model: nn.Module, spec: ModelSpec, mode: str, device: torch.device,
                   budget_gb: float | None = None) -> Placement:
    if mode not in PLACEMENT_MODES:
        raise PlacementError(f"placement.mode={mode!r}: use one of {', '.join(PLACEMENT_MODES)}")
    blocks = spec.blocks(model)
    block_bytes = [module_bytes(b) for b in blocks]
    total = module_bytes(model)
    head = total - sum(block_bytes)
    budget = device_budget(device, budget_gb)
    fits = budget is None or total <= budget
    path = ("device" if mode == "device" or (mode == "auto" and fits) else
            "disk" if mode == "disk" else "offload")
    if path == "device" and not fits:
        raise PlacementError(
            f"the model needs {_size(total)} on {device} but the budget is {_size(budget)}; "
            "use placement.mode=offload (one block at a time) or auto")
    largest = max(block_bytes, default=0)
    if path != "device" and budget is not None and max(largest, head) > budget:
        i = block_bytes.index(largest)
        what = (f"block {i} needs {_size(largest)}" if largest >= head else
                f"the embeddings and head need {_size(head)}")
        raise PlacementError(f"offloading runs one block at a time on {device}, but {what} "
                             f"and the budget is {_size(budget)}; raise "
                             "placement.device_memory_gb or use a larger device")
    return Placement(mode, path, str(device), budget, total, largest, head)


def gpu_device_map(model: nn.Module, spec: ModelSpec, n_gpus: int,
                   per_gpu_bytes: int) -> dict[str, Any]:
    """accelerate device map spreading whole decoder blocks over `n_gpus` GPUs of
    `per_gpu_bytes` each (lm-eval on a model larger than one GPU); raises PlacementError
    when the model does not fit all of them together."""
    from accelerate import infer_auto_device_map

    max_memory: dict[Any, int] = {i: per_gpu_bytes for i in range(n_gpus)}
    block_class = type(spec.blocks(model)[0]).__name__
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=[block_class])
    off = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if off:
        raise PlacementError(f"the model ({_size(module_bytes(model))}) does not fit "
                             f"{n_gpus} GPU(s) of {_size(per_gpu_bytes)} (parts would go "
                             f"to {', '.join(off)}); add GPUs or use eval=ppl, which runs "
                             "block by block")
    return device_map


@contextmanager
def spread_over_gpus(model: nn.Module, spec: ModelSpec, budget_bytes: int | None):
    """Dispatch the model over every visible GPU for the duration (accelerate hooks move
    activations between them), then back to host memory."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    n = torch.cuda.device_count()
    per_gpu = budget_bytes or int(torch.cuda.mem_get_info(0)[0] * (1 - DEVICE_HEADROOM))
    device_map = gpu_device_map(model, spec, n, per_gpu)
    dispatch_model(model, device_map=device_map)
    try:
        yield device_map
    finally:
        remove_hook_from_module(model, recurse=True)
        model.to("cpu")
