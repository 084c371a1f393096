"""Fused int8 activation quantization in Triton (dynamic per token, static per tensor).

Dynamic per token, one program per row m of x [M, K]:
    pass 1: amax = max_k |x[m, k] * smooth_inv[k]|         (BLOCK_K slices, fp32)
            scale[m] = max(amax / 127, eps)                 (div_rn: IEEE, as the reference)
    pass 2: xq[m, k] = rint(clamp(x' / scale[m], -128, 127)) (x re-read, mostly from L2)
Static per tensor: one program per (BLOCK_M x BLOCK_K) tile, xq = rint(clamp(x' / scale)).
Every step is a correctly rounded fp32 op in the same order as `kernels.reference`, so the
int8 output matches it bit for bit (ties included: round half to even on both sides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_common import (
    INTERPRETED,
    check_tensor,
    require,
    round_clamp_int8,
)
from kernels.reference import ACT_SCALE_EPS

_FLOAT_IN = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _quant_per_token_kernel(
    x_ptr, smooth_ptr, xq_ptr, scale_ptr,
    K, stride_xm, stride_qm, eps,
    HAS_SMOOTH: tl.constexpr, USE_RINT: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    rk = tl.arange(0, BLOCK_K)

    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        x = tl.load(x_row + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(smooth_ptr + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), eps)
    tl.store(scale_ptr + row, scale)

    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        x = tl.load(x_row + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(smooth_ptr + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        q = round_clamp_int8(tl.math.div_rn(x, scale), USE_RINT)
        tl.store(q_row + k0 + rk, q, mask=mask)


@triton.jit
def _quant_per_tensor_kernel(
    x_ptr, smooth_ptr, xq_ptr, scale_ptr,
    M, K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr, USE_RINT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(smooth_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
    q = round_clamp_int8(tl.math.div_rn(x, tl.load(scale_ptr)), USE_RINT)
    tl.store(xq_ptr + rm[:, None].to(tl.int64) * stride_qm + rk[None, :], q, mask=mask)


def _check_inputs(x: torch.Tensor, smooth_inv: torch.Tensor | None) -> None:
    check_tensor(x, "x", _FLOAT_IN, x.device, 2)
    if smooth_inv is not None:
        check_tensor(smooth_inv, "smooth_inv", _FLOAT_IN, x.device, 1)
        require(smooth_inv.shape[0] == x.shape[1],
                f"smooth_inv must have shape [{x.shape[1]}], got {tuple(smooth_inv.shape)}")  # fmt: skip


def quant_per_token(
    x: torch.Tensor, smooth_inv: torch.Tensor | None = None, eps: float = ACT_SCALE_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp16/bf16/fp32 (contiguous) -> (xq int8 [M, K], scale fp32 [M]).

    Same math as `kernels.reference.quant_per_token_ref` (bit-exact)."""
    _check_inputs(x, smooth_inv)
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scale
    require(k > 0, "x must have K > 0")
    block_k = min(4096 if not INTERPRETED else 128, triton.next_power_of_2(k))
    _quant_per_token_kernel[(m,)](
        x, smooth_inv if smooth_inv is not None else x, xq, scale,
        k, x.stride(0), xq.stride(0), float(eps),
        HAS_SMOOTH=smooth_inv is not None, USE_RINT=not INTERPRETED, BLOCK_K=block_k,
        num_warps=4 if block_k <= 1024 else 8,
    )  # fmt: skip
    return xq, scale


def quant_per_tensor(
    x: torch.Tensor, scale: torch.Tensor | float, smooth_inv: torch.Tensor | None = None
) -> torch.Tensor:
    """Static per-tensor quant: x [M, K] -> int8 [M, K]; scale: fp32 0-d tensor or float."""
    _check_inputs(x, smooth_inv)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    require(s.numel() == 1, f"per-tensor scale must be a scalar, got shape {tuple(s.shape)}")
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if m == 0 or k == 0:
        return xq
    block_m, block_k = (16, 128) if INTERPRETED else (32, 256)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _quant_per_tensor_kernel[grid](
        x, smooth_inv if smooth_inv is not None else x, xq, s.reshape(1),
        m, k, x.stride(0), xq.stride(0),
        HAS_SMOOTH=smooth_inv is not None, USE_RINT=not INTERPRETED,
        BLOCK_M=block_m, BLOCK_K=block_k,
    )  # fmt: skip
    return xq
