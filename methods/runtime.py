"""Runtime modules: the simulated (FakeQuantLinear) model converted to packed integer weights
that run on the kernels of `kernels.ops` (Triton on CUDA, exact references on CPU).

    W4A8Linear       int4 weights (w_bits <= 4, symmetric) packed two per byte, fp16 group
                     scales [N, K/g]; int8 activations, static per-tensor or dynamic per-token
    W4A8TwoLevelLinear  int4 codes with integer group scales (+ zero points) under fp16
                     per-channel scales (method w_scales=two_level): one int8 GEMM over K
    W8A8Linear       int8 per-channel weights, fp32 scales [N]; int8 activations (SmoothQuant)
    WeightOnlyLinear w_bits <= 8 with fp activations (W4A16, W3A16, W8A16): codes + scales
                     (+ zero points) stored, dequantized per forward, fp matmul

Every module takes the exact integer codes q = round(W_hat / s) (+ z) of its FakeQuantLinear
(`methods.primitives.recover_codes` checks they are on the grid and in range), the same
static activation scale and the same smooth_inv multiplier, so the runtime model computes
the simulated one with integer arithmetic. Combinations without an integer kernel (a8 with
fp weights, a4, asymmetric weights with int8 activations, grouped w8a8) stay FakeQuantLinear;
`convert_to_runtime` logs and reports why.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import ops
from kernels.reference import kernel_layout_chunk
from methods.arch import ModelSpec
from methods.layers import FakeQuantLinear, iter_block_linears, replace_linear, runtime_scale_dtype
from methods.primitives import pack_int4, unpack_int4

log = logging.getLogger(__name__)

INT4_MAX_BITS = 4     # codes of 2..4 bits fit the signed int4 nibble [-8, 7]


def _backend(x: Tensor) -> ops.Backend:
    """CUDA: Triton kernels (ops picks them); CPU: the exact PyTorch references."""
    return "auto" if x.is_cuda else "reference"


class RuntimeLinear(nn.Module):
    """Base of the runtime linears: activation-side fields shared by all of them.

    act_scale fp32 [] (static per-tensor) or None (dynamic per-token / fp activations),
    smooth_inv fp32 [K] or None (x' = x * smooth_inv before quantization), bias [N] or None.
    """

    a_bits: ClassVar[int] = 8

    def __init__(self, in_features: int, out_features: int, *, act_mode: str,
                 act_scale: Tensor | None, smooth_inv: Tensor | None, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.act_mode = in_features, out_features, act_mode
        self.register_buffer("act_scale", None if act_scale is None
                             else act_scale.detach().float().reshape(()).clone())
        self.register_buffer("smooth_inv", None if smooth_inv is None
                             else smooth_inv.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    # ------------------------------------------------------------ dispatch from the simulation
    @classmethod
    @abstractmethod
    def claims(cls, fq: FakeQuantLinear) -> bool:
        """True when fq's (w_bits, a_bits) is this module's domain."""

    @classmethod
    def unsupported(cls, fq: FakeQuantLinear) -> str | None:
        """Why fq cannot take this runtime form although its bits are claimed; None: it can."""
        return None

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantLinear) -> RuntimeLinear:
        if not cls.claims(fq):
            raise ValueError(f"{cls.__name__} does not run w{fq.w_bits}a{fq.a_bits}")
        reason = cls.unsupported(fq)
        if reason:
            raise ValueError(f"{cls.__name__}: {reason}")
        return cls._build(fq)

    @classmethod
    @abstractmethod
    def _build(cls, fq: FakeQuantLinear) -> RuntimeLinear: ...

    # ------------------------------------------------------------ checkpoint layout
    def layout(self) -> dict[str, Any]:
        """JSON description from which `empty` rebuilds a module of the same shapes."""
        return {"kind": type(self).__name__, "in_features": self.in_features,
                "out_features": self.out_features, "a_bits": self.a_bits,
                "act_mode": self.act_mode if self.a_bits < 16 else None,
                "act_scale": None if self.act_scale is None else float(self.act_scale),
                "smooth": self.smooth_inv is not None, "bias": self.bias is not None}

    @classmethod
    @abstractmethod
    def empty(cls, layout: dict[str, Any], dtype: torch.dtype) -> RuntimeLinear:
        """Module with the shapes of `layout` and placeholder values (to load a state dict)."""

    @staticmethod
    def _empty_act(layout: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        k, n = layout["in_features"], layout["out_features"]
        return {"act_mode": layout["act_mode"] or "dynamic_token",
                "act_scale": None if layout["act_scale"] is None else torch.ones(()),
                "smooth_inv": torch.ones(k) if layout["smooth"] else None,
                "bias": torch.zeros(n, dtype=dtype) if layout["bias"] else None}

    @staticmethod
    def _act_of(fq: FakeQuantLinear) -> dict[str, Any]:
        static = fq.a_bits < 16 and fq.act_mode == "static_tensor"
        return {"act_mode": fq.act_mode, "act_scale": fq.act_scale if static else None,
                "smooth_inv": fq.smooth_inv, "bias": fq.bias}


def _group_scales(fq: FakeQuantLinear, dtype: torch.dtype) -> Tensor:
    """fq.w_scale [N, G] in the runtime dtype; exact (FakeQuantLinear snapped it)."""
    s = fq.w_scale.to(dtype)
    if not torch.equal(s.float(), fq.w_scale.float()):
        raise ValueError(f"weight scales are not representable in {dtype}: build the "
                         "FakeQuantLinear through its constructor, which rounds them")
    return s.contiguous()


class W4A8Linear(RuntimeLinear):
    """y = W4A8 GEMM: int8 activations x int4 weights (uint8 [N, K/2] in the kernel layout of
    `kernels.reference.to_kernel_layout`, built from the packing layout by
    `ops.prepare_w4a8_weight`) with fp16 group scales [N, K/g]; per-channel weights use g = K."""

    @classmethod
    def claims(cls, fq: FakeQuantLinear) -> bool:
        return fq.a_bits == 8 and fq.w_bits <= INT4_MAX_BITS and fq.w_scale2 is None

    @classmethod
    def unsupported(cls, fq: FakeQuantLinear) -> str | None:
        if fq.w_zero is not None:
            return ("asymmetric weights (zero points) with int8 activations: the W4A8 kernel "
                    "is symmetric; quantize with method.symmetric=true")
        if fq.in_features % 2:
            return f"K={fq.in_features} is odd; int4 packing needs an even input size"
        return None

    def __init__(self, w_packed: Tensor, w_scale: Tensor, group_size: int, **act: Any):
        super().__init__(2 * w_packed.shape[1], w_packed.shape[0], **act)
        w_packed, w_scale = ops.prepare_w4a8_weight(w_packed, w_scale, group_size)
        self.register_buffer("w_packed", w_packed)
        self.register_buffer("w_scale", w_scale)
        self.group_size = group_size
        self.w_bits = 4

    @classmethod
    def _build(cls, fq: FakeQuantLinear) -> W4A8Linear:
        q = fq.codes().to(torch.int8)
        mod = cls(pack_int4(q), _group_scales(fq, torch.float16),
                  fq.group_size or fq.in_features, **cls._act_of(fq))
        mod.w_bits = fq.w_bits
        return mod

    def forward(self, x: Tensor, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """quantized: (xq, x_scale) of x made upstream (methods.fusion), else quantized here."""
        return ops.w4a8_linear(x, self.w_packed, self.w_scale, self.group_size,
                               act_mode=self.act_mode, act_scale=self.act_scale,
                               smooth_inv=self.smooth_inv, bias=self.bias, backend=_backend(x),
                               quantized=quantized)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "w_bits": self.w_bits, "group_size": self.group_size,
                "w_layout_chunk": kernel_layout_chunk(self.group_size)}

    @classmethod
    def empty(cls, layout: dict[str, Any], dtype: torch.dtype) -> W4A8Linear:
        k, n, g = layout["in_features"], layout["out_features"], layout["group_size"]
        mod = cls(torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, k // g),
                  g, **cls._empty_act(layout, dtype))
        mod.w_bits = layout["w_bits"]
        return mod

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, w{self.w_bits} g{self.group_size}, "
                f"a8 {self.act_mode}{', smooth' if self.smooth_inv is not None else ''}")


class W4A8TwoLevelLinear(RuntimeLinear):
    """y = two-level W4A8 GEMM (`kernels.ops.w4a8_two_level_linear`): int4 codes (uint8
    [N, K/2], kernel layout, signed; asymmetric codes stored - 8 with their zero points),
    integer group scales s2 uint8 [N, K/g], zero points int8 [N, K/g] or none, fp16
    per-channel scales s1 [N]. The kernel forms q8 = s2 * (q - z) in registers and runs one
    int8 GEMM over K; the simulated W_hat = s1 * q8 is the same number (exact in fp32)."""

    @classmethod
    def claims(cls, fq: FakeQuantLinear) -> bool:
        return fq.a_bits == 8 and fq.w_bits <= INT4_MAX_BITS and fq.w_scale2 is not None

    @classmethod
    def unsupported(cls, fq: FakeQuantLinear) -> str | None:
        if fq.in_features % 2:
            return f"K={fq.in_features} is odd; int4 packing needs an even input size"
        return None

    def __init__(self, w_packed: Tensor, w_scale: Tensor, w_scale2: Tensor, w_zero: Tensor | None,
                 group_size: int, **act: Any):
        super().__init__(2 * w_packed.shape[1], w_packed.shape[0], **act)
        packed, s1, s2, z = ops.prepare_two_level_weight(w_packed, w_scale, w_scale2, w_zero, group_size)
        self.register_buffer("w_packed", packed)
        self.register_buffer("w_scale", s1)
        self.register_buffer("w_scale2", s2)
        self.register_buffer("w_zero", z)
        self.group_size = group_size

    @classmethod
    def _build(cls, fq: FakeQuantLinear) -> W4A8TwoLevelLinear:
        q = fq.codes()
        s2 = fq.w_scale2.float()
        s1 = fq.w_scale / s2
        if not torch.equal(s1, s1[:, :1].expand_as(s1)) or not torch.equal(s1.half().float(), s1):
            raise ValueError("two-level scales w_scale / w_scale2 are not one fp16 value per "
                             "output channel: build them with primitives.round_weight_two_level")
        zero = None
        if fq.w_zero is not None:     # asymmetric codes [0, 15] -> signed nibbles, as WeightOnlyLinear
            q, zero = q - 8, (fq.w_zero - 8).to(torch.int8)
        return cls(pack_int4(q.to(torch.int8)), s1[:, 0].half(), s2.to(torch.uint8), zero,
                   fq.group_size, **cls._act_of(fq))

    def forward(self, x: Tensor, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return ops.w4a8_two_level_linear(
            x, self.w_packed, self.w_scale, self.w_scale2, self.w_zero, self.group_size,
            act_mode=self.act_mode, act_scale=self.act_scale, smooth_inv=self.smooth_inv,
            bias=self.bias, backend=_backend(x), quantized=quantized)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "w_bits": 4, "group_size": self.group_size,
                "zero_point": self.w_zero is not None,
                "w_layout_chunk": kernel_layout_chunk(self.group_size)}

    @classmethod
    def empty(cls, layout: dict[str, Any], dtype: torch.dtype) -> W4A8TwoLevelLinear:
        k, n, g = layout["in_features"], layout["out_features"], layout["group_size"]
        s2 = torch.ones(n, k // g, dtype=torch.uint8)
        zero = torch.zeros(n, k // g, dtype=torch.int8) if layout["zero_point"] else None
        return cls(torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n), s2, zero, g,
                   **cls._empty_act(layout, dtype))

    def extra_repr(self) -> str:
        z = ", asym" if self.w_zero is not None else ""
        return (f"{self.in_features}->{self.out_features}, w4 two-level g{self.group_size}{z}, "
                f"a8 {self.act_mode}{', smooth' if self.smooth_inv is not None else ''}")


class W8A8Linear(RuntimeLinear):
    """y = W8A8 GEMM: int8 activations x int8 per-channel weights wq [N, K], fp32 scales [N]."""

    @classmethod
    def claims(cls, fq: FakeQuantLinear) -> bool:
        return fq.a_bits == 8 and fq.w_bits == 8

    @classmethod
    def unsupported(cls, fq: FakeQuantLinear) -> str | None:
        if fq.w_zero is not None:
            return ("asymmetric weights (zero points) with int8 activations: the W8A8 kernel "
                    "is symmetric; quantize with method.symmetric=true")
        if fq.w_scale.shape[1] != 1:
            return (f"group-wise 8-bit weights (group {fq.group_size}): the W8A8 kernel takes "
                    "per-channel scales; use bits.group_size=null")
        return None

    def __init__(self, wq: Tensor, w_scale: Tensor, **act: Any):
        super().__init__(wq.shape[1], wq.shape[0], **act)
        if wq.dtype != torch.int8 or w_scale.shape != (wq.shape[0],):
            raise ValueError(f"W8A8Linear needs wq int8 [N, K] and w_scale [N], got "
                             f"{wq.dtype} {tuple(wq.shape)} and {tuple(w_scale.shape)}")
        self.register_buffer("wq", wq.contiguous())
        self.register_buffer("w_scale", w_scale.float().contiguous())

    @classmethod
    def _build(cls, fq: FakeQuantLinear) -> W8A8Linear:
        return cls(fq.codes().to(torch.int8), _group_scales(fq, torch.float32)[:, 0],
                   **cls._act_of(fq))

    def forward(self, x: Tensor, quantized: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return ops.w8a8_linear(x, self.wq, self.w_scale, act_mode=self.act_mode,
                               act_scale=self.act_scale, smooth_inv=self.smooth_inv,
                               bias=self.bias, backend=_backend(x), quantized=quantized)

    @classmethod
    def empty(cls, layout: dict[str, Any], dtype: torch.dtype) -> W8A8Linear:
        k, n = layout["in_features"], layout["out_features"]
        return cls(torch.zeros(n, k, dtype=torch.int8), torch.ones(n),
                   **cls._empty_act(layout, dtype))

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, w8 per-channel, a8 {self.act_mode}"
                f"{', smooth' if self.smooth_inv is not None else ''}")


class WeightOnlyLinear(RuntimeLinear):
    """Weight-only (w_bits <= 8, fp activations): W = (q - z) * s dequantized per forward.

    Codes are stored signed: <= 4 bits int4-packed uint8 [N, K/2] with fp16 scales, 8 bits
    int8 [N, K] with fp32 scales; asymmetric codes q in [0, 2^b - 1] are shifted by -2^(b-1)
    (as is z, stored int8 [N, G]) so the same signed storage holds them.
    """

    a_bits: ClassVar[int] = 16

    @classmethod
    def claims(cls, fq: FakeQuantLinear) -> bool:
        return fq.a_bits >= 16 and fq.w_bits < 16

    def __init__(self, codes: Tensor, w_scale: Tensor, w_zero: Tensor | None, w_bits: int,
                 in_features: int, **act: Any):
        super().__init__(in_features, w_scale.shape[0], **act)
        self.w_bits = w_bits
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("w_scale", w_scale.contiguous())
        self.register_buffer("w_zero", None if w_zero is None else w_zero.to(torch.int8))

    @property
    def packed(self) -> bool:
        return self.w_bits <= INT4_MAX_BITS

    @property
    def group_size(self) -> int:
        return self.in_features // self.w_scale.shape[1]

    @classmethod
    def _build(cls, fq: FakeQuantLinear) -> WeightOnlyLinear:
        shift = 2 ** (fq.w_bits - 1) if fq.w_zero is not None else 0
        q = (fq.codes() - shift).to(torch.int8)
        zero = None if fq.w_zero is None else fq.w_zero - shift
        codes = pack_int4(q) if fq.w_bits <= INT4_MAX_BITS else q
        return cls(codes, _group_scales(fq, runtime_scale_dtype(fq.w_bits)), zero, fq.w_bits,
                   fq.in_features, **cls._act_of(fq))

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """W_hat [N, K] = (q - z) * s in fp32, cast to dtype (as FakeQuantLinear built it)."""
        q = unpack_int4(self.codes) if self.packed else self.codes
        n, groups = self.w_scale.shape
        qg = q.float().view(n, groups, -1)
        if self.w_zero is not None:
            qg = qg - self.w_zero.float()[..., None]
        return (qg * self.w_scale.float()[..., None]).view(n, -1).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "w_bits": self.w_bits, "group_size": self.group_size,
                "zero_point": self.w_zero is not None}

    @classmethod
    def empty(cls, layout: dict[str, Any], dtype: torch.dtype) -> WeightOnlyLinear:
        k, n, b = layout["in_features"], layout["out_features"], layout["w_bits"]
        groups = k // layout["group_size"]
        codes = (torch.zeros(n, k // 2, dtype=torch.uint8) if b <= INT4_MAX_BITS
                 else torch.zeros(n, k, dtype=torch.int8))
        zero = torch.zeros(n, groups, dtype=torch.int8) if layout["zero_point"] else None
        return cls(codes, torch.ones(n, groups, dtype=runtime_scale_dtype(b)), zero, b, k,
                   **cls._empty_act(layout, dtype))

    def extra_repr(self) -> str:
        z = ", asym" if self.w_zero is not None else ""
        return f"{self.in_features}->{self.out_features}, w{self.w_bits} g{self.group_size}{z}, a16"


RUNTIME_FORMS: tuple[type[RuntimeLinear], ...] = (W4A8Linear, W4A8TwoLevelLinear, W8A8Linear,
                                                   WeightOnlyLinear)
RUNTIME_KINDS: dict[str, type[RuntimeLinear]] = {c.__name__: c for c in RUNTIME_FORMS}
# every block-linear module a stored layout can name: kind -> class with layout() / empty()
LINEAR_KINDS: dict[str, type[RuntimeLinear] | type[FakeQuantLinear]] = {
    **RUNTIME_KINDS, FakeQuantLinear.__name__: FakeQuantLinear}


def runtime_form(fq: FakeQuantLinear) -> tuple[type[RuntimeLinear] | None, str]:
    """(runtime class, "") for fq, or (None, why it stays simulated)."""
    if type(fq) is not FakeQuantLinear:      # e.g. TransformedLinear: rotations around W_hat
        return None, (f"{type(fq).__name__}: no kernel applies its transforms around the "
                      "integer weights; kept simulated")
    if fq.w_bits >= 16 and fq.a_bits >= 16:
        return None, "w16a16: nothing is quantized"
    for cls in RUNTIME_FORMS:
        if cls.claims(fq):
            reason = cls.unsupported(fq)
            return (cls, "") if reason is None else (None, f"{cls.__name__}: {reason}")
    return None, (f"no integer kernel for w{fq.w_bits}a{fq.a_bits} (runtime forms: w<=4 a8, "
                  "w8a8 per-channel, w<=8 with fp activations); kept simulated")


def convert_to_runtime(model: nn.Module, spec: ModelSpec,
                       report: dict[str, Any] | None = None) -> nn.Module:
    """Replace every convertible FakeQuantLinear of the blocks by its runtime module, in place.

    report (filled when given): {"converted": {class: count}, "kept": {full name: reason}}.
    Plain nn.Linear (kept in fp by keep_fp) and non-block modules (lm_head) are left as is.
    """
    converted: dict[str, int] = {}
    kept: dict[str, str] = {}
    for _, _, full, mod in list(iter_block_linears(model, spec)):
        if not isinstance(mod, FakeQuantLinear):
            kept[full] = f"{type(mod).__name__}: not quantized"
            continue
        cls, reason = runtime_form(mod)
        if cls is None:
            kept[full] = reason
            continue
        try:
            new = cls.from_fake_quant(mod)
        except ValueError as e:
            raise ValueError(f"{full}: {e}") from e
        replace_linear(model, full, new)
        converted[cls.__name__] = converted.get(cls.__name__, 0) + 1
    for reason in sorted(set(kept.values())):
        names = [n for n, r in kept.items() if r == reason]
        log.warning("runtime: %d linears stay as they are (%s), e.g. %s", len(names), reason,
                    names[0])
    log.info("runtime: converted %s", converted or "nothing")
    if report is not None:
        report.update(converted=converted, kept=kept)
    return model
