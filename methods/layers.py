"""Module swaps for simulated quantization.

`FakeQuantLinear` holds W_hat (weights already on the integer grid, dequantized) with
the grid's scales / zero points, so the runtime path can recover the exact integer
codes, plus an input quantizer: optional per-channel pre-scale X / s (used only where
s could not be folded into the producer), then int fake-quant of X, static per-tensor
or dynamic per-token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.arch import ModelSpec, set_module
from methods.base import ActMode, QuantConfig
from methods.primitives import (
    Grid,
    QParams,
    fake_quantize_activation,
    grid_divisor,
    recover_codes,
    round_weight,
    round_weight_two_level,
)

# Weights of <= 4 bits run int4-packed with fp16 group scales (kernels/README.md); wider
# ones keep fp32 scales. FakeQuantLinear snaps its scales to this dtype so the simulated
# and runtime models use one grid (fp32 vs fp16 scales differ by up to 2^-11 relative).
PACKED_W_BITS = 4
PACKED_SCALE_DTYPE = torch.float16


def runtime_scale_dtype(w_bits: int) -> torch.dtype:
    return PACKED_SCALE_DTYPE if w_bits <= PACKED_W_BITS else torch.float32


# dtypes a stored layout may name (a layout is data read from disk: never getattr(torch, x))
DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int8, torch.uint8, torch.int32, torch.int64)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one a quantized model stores; "
                         f"known: {sorted(DTYPES)}")
    return DTYPES[name]


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, *, w_bits: int = 16, group_size: int | None = None,
                 w_qparams: QParams | None = None, a_bits: int = 16,
                 act_mode: str = "dynamic_token", act_scale: float | None = None,
                 smooth_inv: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = (nn.Parameter(linear.bias.detach(), requires_grad=False)
                     if linear.bias is not None else None)
        self.w_bits, self.group_size, self.a_bits, self.act_mode = (
            w_bits, group_size, a_bits, act_mode)
        self.w_symmetric = w_qparams is None or w_qparams.zero is None
        dev = self.weight.device
        self.register_buffer("w_scale", None if w_qparams is None else
                             w_qparams.scale.reshape(self.out_features, -1).to(dev))
        self.register_buffer("w_zero", None if w_qparams is None or w_qparams.zero is None
                             else w_qparams.zero.reshape(self.out_features, -1).to(dev))
        # two-level weights: integer group scales s2 [N, G]; w_scale = s1 * s2 (s1 per channel)
        self.register_buffer("w_scale2", None if w_qparams is None or w_qparams.scale2 is None
                             else w_qparams.scale2.reshape(self.out_features, -1).to(dev))
        self.register_buffer("act_scale", None if act_scale is None else
                             torch.tensor(float(act_scale), dtype=torch.float32, device=dev))
        self.register_buffer("smooth_inv", None if smooth_inv is None else
                             smooth_inv.detach().float().to(dev))
        if self.w_scale is not None and runtime_scale_dtype(w_bits) != torch.float32:
            self._snap_scales(runtime_scale_dtype(w_bits))
        if a_bits < 16 and act_mode == "static_tensor" and act_scale is None:
            raise ValueError("static per-tensor activation quantization needs act_scale")

    def _snap_scales(self, dtype: torch.dtype) -> None:
        """s -> s rounded to `dtype` (clamped to its range), W_hat = (q - z) * s re-derived
        from the exact codes q; the grid stays the method's, up to the scale rounding."""
        q = recover_codes(self.weight, self.w_scale, self.w_zero, self.w_bits)
        info = torch.finfo(dtype)
        s2 = self.w_scale2.float() if self.w_scale2 is not None else 1.0
        s1 = self.w_scale / s2  # two-level: the per-channel level is the one stored in fp16
        if float(s1.max()) > info.max:
            raise ValueError(f"weight scale {float(s1.max()):.3g} overflows {dtype}")
        s = s1.clamp(min=info.smallest_normal * info.eps).to(dtype).float() * s2
        groups = s.shape[1]
        qg = q.float().view(self.out_features, groups, -1)
        if self.w_zero is not None:
            qg = qg - self.w_zero.float()[..., None]
        self.w_scale = s
        self.weight.data = (qg * s[..., None]).view_as(q).to(self.weight.dtype)

    # ------------------------------------------------------------ layout (one schema)
    def layout(self) -> dict[str, Any]:
        """JSON description from which `empty` rebuilds a module of the same shapes and
        buffer dtypes; the fields RuntimeLinear.layout has mean the same here."""
        return {"kind": type(self).__name__, "in_features": self.in_features,
                "out_features": self.out_features, "w_bits": self.w_bits,
                "group_size": self.group_size,
                "scale_groups": None if self.w_scale is None else int(self.w_scale.shape[1]),
                "zero_point": self.w_zero is not None, "a_bits": self.a_bits,
                "act_mode": self.act_mode,
                "act_scale": None if self.act_scale is None else float(self.act_scale),
                "smooth": self.smooth_inv is not None, "bias": self.bias is not None,
                "two_level": self.w_scale2 is not None,
                "dtypes": {n: dtype_name(b.dtype)
                           for n, b in self.named_buffers(recurse=False) if b is not None}}

    @classmethod
    def empty(cls, layout: Mapping[str, Any], dtype: torch.dtype) -> FakeQuantLinear:
        """Module with the shapes and buffer dtypes of `layout`, weight and bias in `dtype`,
        placeholder values (zero weights, unit scales) to load a state dict into. Layouts
        without "dtypes" (checkpoints before it was recorded) get fp32 buffers."""
        k, n = layout["in_features"], layout["out_features"]
        lin = nn.Linear(k, n, bias=layout["bias"], dtype=dtype)
        nn.init.zeros_(lin.weight)           # zero weights are on any grid (codes 0)
        qp = None
        if layout["scale_groups"]:
            g = layout["scale_groups"]
            qp = QParams(torch.ones(n, g), torch.zeros(n, g) if layout["zero_point"] else None,
                         layout["w_bits"], torch.ones(n, g) if layout.get("two_level") else None)
        fq = cls(lin, w_bits=layout["w_bits"], group_size=layout["group_size"], w_qparams=qp,
                 a_bits=layout["a_bits"], act_mode=layout["act_mode"],
                 act_scale=None if layout["act_scale"] is None else 1.0,
                 smooth_inv=torch.ones(k) if layout["smooth"] else None)
        for name, dname in layout.get("dtypes", {}).items():
            buf = fq._buffers.get(name)
            if buf is None:
                raise ValueError(f"layout names a dtype for {name!r}, which this "
                                 f"{layout['kind']} does not hold")
            fq._buffers[name] = buf.to(dtype_from_name(dname))
        return fq

    def codes(self) -> Tensor:
        """Integer weight codes q [N, K] int32 (asymmetric: in [0, 2^b - 1], W = (q - z) s)."""
        if self.w_scale is None:
            raise ValueError("this linear has fp weights (w_bits=16): no integer codes")
        return recover_codes(self.weight, self.w_scale, self.w_zero, self.w_bits)

    @staticmethod
    def static_scale_from_max(v: float, a_bits: int, grid: Grid = "narrow") -> float:
        """Per-tensor scale s = v / d for a calibrated range v (d: `grid_divisor`; narrow:
        2^(b-1) - 1)."""
        return max(float(v), 1e-8) / grid_divisor(a_bits, grid)

    def forward(self, x: Tensor) -> Tensor:
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        if self.a_bits < 16:
            x = fake_quantize_activation(x, self.a_bits, self.act_mode, self.act_scale)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        g = f", g{self.group_size}" if self.group_size else ""
        return (f"{self.in_features}->{self.out_features}, w{self.w_bits}{g}, a{self.a_bits} "
                f"{self.act_mode if self.a_bits < 16 else ''}"
                f"{', smooth' if self.smooth_inv is not None else ''}")


def iter_block_linears(model: nn.Module, spec: ModelSpec
                       ) -> Iterator[tuple[int, str, str, nn.Module]]:
    """(block index, block-relative name, full name, module) for every quantizable linear."""
    for i, block in enumerate(spec.blocks(model)):
        for rel in spec.table.linear_names():
            yield i, rel, f"{spec.table.blocks}.{i}.{rel}", block.get_submodule(rel)


def replace_linear(model: nn.Module, full_name: str, new: nn.Module) -> None:
    set_module(model, full_name, new)


Precision = Literal["fp", "w8", "default"]


def precision_for(cfg: QuantConfig, full_name: str) -> Precision:
    """Mixed-precision decision for one block linear: kept in full precision (keep_fp),
    at 8-bit per-channel weights (keep_w8), or quantized as the config says."""
    if cfg.keeps(full_name):
        return "fp"
    if cfg.keeps_w8(full_name) and cfg.quantizes_weights:
        return "w8"
    return "default"


def config_for(cfg: QuantConfig, full_name: str) -> QuantConfig | None:
    """The config to quantize `full_name` with: None to leave it in full precision, cfg
    itself, or cfg at w8 per-channel weights (activation settings unchanged). Every method
    routes its per-linear decisions through here so keep_fp / keep_w8 mean the same."""
    precision = precision_for(cfg, full_name)
    if precision == "fp":
        return None
    if precision == "w8" and (cfg.w_bits != 8 or cfg.group_size):
        return dataclasses.replace(cfg, w_bits=8, group_size=None, keep_fp=(), keep_w8=(),
                                   w_scales="group")
    return cfg


def round_and_wrap(linear: nn.Linear, cfg: QuantConfig, *, act_range: float | None = None,
                   act_mode: ActMode | None = None,
                   solved: tuple[Tensor, QParams] | None = None,
                   clip_ratio: float = 1.0) -> FakeQuantLinear:
    """The step every method ends a block linear with: W onto cfg's weight grid, then
    wrapped with cfg's input quantizer. Mutates linear.weight; returns the module to swap in.

    cfg        the linear's own config, from `config_for` (w8 per-channel under keep_w8)
    solved     (W_hat [N, K], qparams) a solver already put on the grid (GPTQ); None: round
               W to nearest at cfg.w_bits / group_size / symmetric, range * clip_ratio
    act_mode   overrides cfg.act_mode (FPTQ picks it per linear group)
    act_range  calibrated range v of the input as the quantized model sees it (max|X|, or
               cfg.act_range's estimate); needed for static per-tensor activations
               (scale v / grid_divisor(a_bits, cfg.a_grid))
    """
    qp = None
    if solved is not None:
        if not cfg.quantizes_weights:
            raise ValueError(f"solved weights given for a w{cfg.w_bits} config")
        W_hat, qp = solved
        linear.weight.data = W_hat.to(linear.weight.dtype).reshape(linear.weight.shape)
    elif cfg.quantizes_weights and cfg.w_scales == "group":
        linear.weight.data, qp = round_weight(linear.weight.data, cfg.w_bits, cfg.group_size,
                                              cfg.symmetric, clip_ratio, cfg.w_grid)
    if cfg.w_scales == "two_level":
        # onto the two-level grid; a solver's W_hat (on its group grid) is rounded once more
        linear.weight.data, qp = round_weight_two_level(
            linear.weight.data, cfg.group_size, cfg.symmetric,
            1.0 if solved is not None else clip_ratio)
    mode = act_mode or cfg.act_mode
    act_scale = None
    if cfg.quantizes_activations and mode == "static_tensor":
        if act_range is None:
            raise ValueError("static per-tensor activation quantization needs a calibrated "
                             "range act_range = max|X| (collect calibration statistics)")
        act_scale = FakeQuantLinear.static_scale_from_max(act_range, cfg.a_bits, cfg.a_grid)
    return FakeQuantLinear(linear, w_bits=cfg.w_bits, group_size=cfg.group_size, w_qparams=qp,
                           a_bits=cfg.a_bits, act_mode=mode, act_scale=act_scale)
