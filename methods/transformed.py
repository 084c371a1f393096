"""A FakeQuantLinear whose integer grid lives in a rotated basis (QuIP, QuaRot).

    y = T_out( Q_a(T_in(x)) W_hat^T ) + b
    T_in(x)  = R_in (x * smooth_inv)     smooth_inv [K] (QuIP: 1/s), R_in [K, K] orthogonal
    T_out(z) = R_out^T z                 R_out [N, N] orthogonal
    => x W_tilde^T with W_tilde = R_out^T W_hat R_in diag(smooth_inv)

W_hat [N, K] is FakeQuantLinear's weight on its grid (codes, scales, zeros as usual, so
size accounting and code recovery are unchanged). Without an activation quantizer the
transforms are undone once into the dense W_tilde (one matmul per forward); with one
(QuaRot's online Hadamard before per-token quantization) R_in runs online.
No integer kernel implements the transforms: runtime conversion keeps these simulated.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from methods.layers import FakeQuantLinear
from methods.primitives import QParams, fake_quantize_activation
from methods.rotation import Rotation


class TransformedLinear(FakeQuantLinear):
    def __init__(self, fq: FakeQuantLinear, *, r_in: Rotation | None = None,
                 r_out: Rotation | None = None, smooth_inv: Tensor | None = None):
        qp = None if fq.w_scale is None else _qparams(fq)
        super().__init__(fq, w_bits=fq.w_bits, group_size=fq.group_size, w_qparams=qp,
                         a_bits=fq.a_bits, act_mode=fq.act_mode,
                         act_scale=None if fq.act_scale is None else float(fq.act_scale),
                         smooth_inv=smooth_inv if smooth_inv is not None else fq.smooth_inv)
        if r_in is not None and r_in.n != self.in_features:
            raise ValueError(f"r_in of order {r_in.n} for in_features {self.in_features}")
        if r_out is not None and r_out.n != self.out_features:
            raise ValueError(f"r_out of order {r_out.n} for out_features {self.out_features}")
        self.r_in, self.r_out = r_in, r_out
        self.register_buffer("w_dense", self.dense_weight() if self.a_bits >= 16 else None,
                             persistent=False)

    def dense_weight(self) -> Tensor:
        """W_tilde = R_out^T W_hat R_in diag(smooth_inv) [N, K] (fp32 arithmetic)."""
        W = self.weight.detach().float()
        if self.r_in is not None:
            W = self.r_in.apply_t(W)                     # rows w -> R_in^T w: W_hat R_in
        if self.r_out is not None:
            W = self.r_out.apply_t(W.T).T                # columns c -> R_out^T c
        if self.smooth_inv is not None:
            W = W * self.smooth_inv.float()[None, :]
        return W.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.w_dense is not None:
            return F.linear(x, self.w_dense.to(x.dtype), self.bias)
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        if self.r_in is not None:
            x = self.r_in.apply(x)
        if self.a_bits < 16:
            x = fake_quantize_activation(x, self.a_bits, self.act_mode, self.act_scale)
        y = F.linear(x, self.weight)
        if self.r_out is not None:
            y = self.r_out.apply_t(y)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def layout(self) -> dict:
        raise ValueError("a TransformedLinear has state outside the FakeQuantLinear layout "
                         "(its rotations); it cannot be stored in a checkpoint or the cache")

    def extra_repr(self) -> str:
        parts = [f"R_in {self.r_in.kind}" if self.r_in is not None else "",
                 f"R_out {self.r_out.kind}" if self.r_out is not None else ""]
        return ", ".join([super().extra_repr(), *[p for p in parts if p]])


def _qparams(fq: FakeQuantLinear) -> QParams:
    return QParams(fq.w_scale, fq.w_zero, fq.w_bits)


def with_input_rotation(linear: nn.Module, rotation: Rotation) -> TransformedLinear:
    """An unquantized (w16a16) TransformedLinear computing linear(x) through R: its weight
    becomes W R^T and its input R x (R applied online, e.g. QuaRot's down_proj)."""
    if isinstance(linear, FakeQuantLinear):
        raise TypeError("rotate the input of a plain linear before quantizing it")
    rotated = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
    rotated.weight.data = rotation.apply(linear.weight.data)
    if linear.bias is not None:
        rotated.bias.data = linear.bias.data.clone()
    fq = FakeQuantLinear(rotated, w_bits=16, a_bits=16)
    out = TransformedLinear(fq, r_in=rotation)
    out.w_dense = None                                   # keep R online: quantized later
    return out
