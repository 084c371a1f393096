"""RMSNorm fused with int8 activation quantization: one launch produces the norm's output y
and the int8 codes + scales the next (fused) linear multiplies.

One program per row m of x [M, K] (three passes over the row; K <= a few thousand stays in
L1/L2):
    pass 1: var = sum_k f32(x)^2 / K,  rstd = 1 / sqrt(var + eps)       (IEEE sqrt, divide)
    pass 2: y = w * (f32(x) * rstd).to(x.dtype) (as Hugging Face's LlamaRMSNorm), stored;
            x' = f32(y) * smooth_inv; amax |x'| and a NaN / inf flag
            scale = max(amax / 127, eps_q) (dynamic; NaN for a non-finite row) or the static
            scale (NaN for a non-finite row)
    pass 3: y recomputed from x (same ops, same bits), xq = round_clamp(x' / scale)
Matches `kernels.reference.rmsnorm_quant_ref` up to the order of the pass-1 sum (torch sums
in another order: var, and so rarely a code on a rounding boundary, may differ by an ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_common import INTERPRETED, check_tensor, require
from kernels.quant_per_token import _codes
from kernels.reference import ACT_SCALE_EPS
from kernels.validate import static_scale

_FLOAT_IN = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _norm_row(x_ptr, w_ptr, k0, rk, K, rstd):
    mask = k0 + rk < K
    x = tl.load(x_ptr + k0 + rk, mask=mask, other=0.0)
    h = (x.to(tl.float32) * rstd).to(x.dtype)
    w = tl.load(w_ptr + k0 + rk, mask=mask, other=0.0)
    return (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype), mask


@triton.jit
def _rmsnorm_quant_kernel(
    x_ptr, w_ptr, smooth_ptr, y_ptr, xq_ptr, scale_ptr, static_ptr,
    K, stride_xm, stride_ym, stride_qm, eps, qeps,
    HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, USE_RINT: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    rk = tl.arange(0, BLOCK_K)

    ssq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        ssq += x * x
    var = tl.math.div_rn(tl.sum(ssq, axis=0), K.to(tl.float32))
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))

    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        y, mask = _norm_row(x_row, w_ptr, k0, rk, K, rstd)
        tl.store(y_ptr + row * stride_ym + k0 + rk, y, mask=mask)
        v = y.to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(smooth_ptr + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        av = tl.abs(v)
        amax = tl.maximum(amax, av)
        bad = tl.maximum(bad, tl.where(av < float("inf"), 0, 1))
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), qeps)
    scale = tl.where(tl.max(bad, axis=0) == 0, scale, float("nan"))
    tl.store(scale_ptr + row, scale)

    for k0 in range(0, K, BLOCK_K):
        y, mask = _norm_row(x_row, w_ptr, k0, rk, K, rstd)
        v = y.to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(smooth_ptr + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        tl.store(xq_ptr + row * stride_qm + k0 + rk, _codes(v, scale, USE_RINT), mask=mask)


def rmsnorm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, act_scale: float | torch.Tensor | None = None,
    smooth_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (y [M, K] in x.dtype, xq int8 [M, K], x_scale fp32 [M]); act_scale None:
    dynamic per token, else static (finite, > 0). weight [K] in x.dtype."""
    check_tensor(x, "x", _FLOAT_IN, x.device, 2)
    m, k = x.shape
    check_tensor(weight, "weight", x.dtype, x.device, 1)
    require(weight.shape == (k,), f"weight must have shape [{k}], got {tuple(weight.shape)}")
    if smooth_inv is not None:
        check_tensor(smooth_inv, "smooth_inv", _FLOAT_IN, x.device, 1)
        require(smooth_inv.shape == (k,), f"smooth_inv must have shape [{k}], got {tuple(smooth_inv.shape)}")
    s = None if act_scale is None else static_scale(act_scale, "act_scale", x.device)
    y = torch.empty_like(x)
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, xq, scale
    require(k > 0, "x must have K > 0")
    block_k = min(4096 if not INTERPRETED else 128, triton.next_power_of_2(k))
    _rmsnorm_quant_kernel[(m,)](
        x, weight, smooth_inv if smooth_inv is not None else weight, y, xq, scale,
        s.reshape(1) if s is not None else scale,
        k, x.stride(0), y.stride(0), xq.stride(0), float(eps), ACT_SCALE_EPS,
        HAS_SMOOTH=smooth_inv is not None, STATIC=s is not None, USE_RINT=not INTERPRETED,
        BLOCK_K=block_k, num_warps=4 if block_k <= 1024 else 8,
    )  # fmt: skip
    return y, xq, scale
