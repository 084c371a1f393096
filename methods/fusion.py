"""One launch per linear group in the runtime model (after `convert_to_runtime`).

For each LinearGroup of the family table whose linears read one input (q/k/v, gate/up) and
are runtime linears of one kind with the same activation quantizer (mode, static scale,
smooth_inv), the group runs as ONE GEMM over the concatenated output channels
(`FusedLinearGroup`); each member is replaced by a `GroupSlice` returning its columns.
Where the group's input comes from an RMSNorm (norm_kind "rmsnorm"), the norm is replaced by
`FusedRMSNormQuant`, which computes the norm and the int8 quantization of its output (with
the group's LAE / SmoothQuant 1/s) in one launch and hands the codes to the GEMM. Per
decoder block: norm+quant, qkv GEMM, o (quant + GEMM), norm+quant, gate/up GEMM, down.

Every output equals the unfused runtime model's: the same codes, scales and integer sums per
output channel (bit for bit on the reference path; on the Triton path up to the order of the
norm's variance sum and of split-K partial sums). A runtime transform: checkpoints are saved
unfused (`convert_to_runtime` output) and fused after loading.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from kernels import ops
from methods.arch import ModelSpec
from methods.runtime import RuntimeLinear, W4A8Linear, W4A8TwoLevelLinear, W8A8Linear, _backend

log = logging.getLogger(__name__)

FUSABLE = (W4A8Linear, W4A8TwoLevelLinear, W8A8Linear)
# buffers indexed by output channel first (concatenated); the others are shared by the group
_PER_OUTPUT = ("w_packed", "w_scale", "w_scale2", "w_zero", "wq", "bias")


class FusedLinearGroup(nn.Module):
    """The linears of one group as one runtime linear over their concatenated outputs.

    output(x) runs the GEMM once per input tensor: the members' GroupSlice calls on the same
    x reuse it. Codes handed over by a FusedRMSNormQuant for exactly this x skip the
    activation quantization."""

    def __init__(self, linear: RuntimeLinear, sizes: list[int]):
        super().__init__()
        self.linear, self.sizes = linear, sizes
        self._last: tuple[Tensor, int, Tensor] | None = None
        self._handed: tuple[Tensor, int, Tensor, Tensor] | None = None

    def hand_over(self, y: Tensor, xq: Tensor, xs: Tensor) -> None:
        self._handed = (y, y._version, xq, xs)

    def output(self, x: Tensor) -> Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        handed, self._handed = self._handed, None
        quantized = None
        if handed is not None and handed[0] is x and handed[1] == x._version:
            quantized = (handed[2], handed[3])
        y = self.linear(x, quantized=quantized)
        self._last = (x, x._version, y)
        return y

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class GroupSlice(nn.Module):
    """Stands where one member linear was: its columns [start, end) of the group's output."""

    def __init__(self, group: FusedLinearGroup, start: int, end: int):
        super().__init__()
        self._group = [group]   # a list: not registered twice in the module tree
        self.start, self.end = start, end
        self.in_features, self.out_features = group.linear.in_features, end - start

    def forward(self, x: Tensor) -> Tensor:
        return self._group[0].output(x)[..., self.start:self.end]

    def extra_repr(self) -> str:
        return f"columns [{self.start}, {self.end}) of a fused group"


class FusedRMSNormQuant(nn.Module):
    """LLaMA RMSNorm whose output is also quantized to int8 for the group it feeds, in one
    launch (`ops.rmsnorm_quantize`); returns the norm's output like the module it replaces."""

    def __init__(self, norm: nn.Module, group: FusedLinearGroup):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)
        self._group = [group]

    def forward(self, x: Tensor) -> Tensor:
        lin = self._group[0].linear
        x2d = x.reshape(-1, x.shape[-1])
        y, xq, xs = ops.rmsnorm_quantize(
            x2d, self.weight.to(x.dtype), self.eps, lin.act_mode, lin.act_scale, lin.smooth_inv,
            backend=_backend(x))
        y = y.view(x.shape)
        self._group[0].hand_over(y, xq, xs)
        return y


def _same_quantizer(mods: list[RuntimeLinear]) -> str | None:
    """Why these linears cannot share one GEMM and one activation quantization, or None."""
    first = mods[0]
    if any(type(m) is not type(first) for m in mods) or not isinstance(first, FUSABLE):
        return "members are not runtime linears of one fusable kind"
    for m in mods[1:]:
        if (m.in_features, m.act_mode, getattr(m, "group_size", None), getattr(m, "w_bits", None)) != (
                first.in_features, first.act_mode, getattr(first, "group_size", None),
                getattr(first, "w_bits", None)):
            return "different input size, activation mode or weight format"
        for name in ("act_scale", "smooth_inv"):
            a, b = getattr(first, name), getattr(m, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                return f"different {name}"
        if (first.bias is None) != (m.bias is None):
            return "bias on some members only"
        if (getattr(first, "w_zero", None) is None) != (getattr(m, "w_zero", None) is None):
            return "zero points on some members only"
    return None


def _concat(mods: list[RuntimeLinear]) -> RuntimeLinear:
    layout = {**mods[0].layout(), "out_features": sum(m.out_features for m in mods)}
    dtype = mods[0].bias.dtype if mods[0].bias is not None else torch.float32
    fused = type(mods[0]).empty(layout, dtype)
    for name, buf in mods[0].named_buffers(recurse=False):
        if buf is None:
            continue
        value = (torch.cat([getattr(m, name) for m in mods]) if name in _PER_OUTPUT else buf)
        setattr(fused, name, value.clone())
    if hasattr(mods[0], "w_bits"):
        fused.w_bits = mods[0].w_bits
    return fused.to(next(iter(b for b in mods[0].buffers())).device)


def fuse_runtime(model: nn.Module, spec: ModelSpec, report: dict[str, Any] | None = None
                 ) -> nn.Module:
    """Fuse every eligible linear group (and its feeding RMSNorm) of the blocks, in place.
    report (filled when given): {"groups": n fused, "norms": n fused, "kept": {name: why}}."""
    groups = norms = 0
    kept: dict[str, str] = {}
    for i, block in enumerate(spec.blocks(model)):
        for g in spec.table.groups:
            if len(g.linears) < 2 and g.feeder_kind != "norm":
                continue
            name = f"{spec.table.blocks}.{i}.{g.role}"
            mods = [block.get_submodule(rel) for rel in g.linears]
            why = _same_quantizer(mods)
            if why:
                kept[name] = why
                continue
            group = FusedLinearGroup(_concat(mods), [m.out_features for m in mods])
            setattr(block, f"fused_{g.role}", group)
            start = 0
            for rel, m in zip(g.linears, mods, strict=True):
                _set(block, rel, GroupSlice(group, start, start + m.out_features))
                start += m.out_features
            groups += 1
            feeder = block.get_submodule(g.feeder) if g.feeder_kind == "norm" else None
            if (spec.table.norm_kind == "rmsnorm" and feeder is not None
                    and hasattr(feeder, "variance_epsilon") and mods[0].a_bits == 8):
                _set(block, g.feeder, FusedRMSNormQuant(feeder, group))
                norms += 1
    log.info("runtime fusion: %d linear groups, %d norms fused; kept %d", groups, norms, len(kept))
    if report is not None:
        report.update(groups=groups, norms=norms, kept=kept)
    return model


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
