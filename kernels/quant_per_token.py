"""Fused int8 activation quantization in Triton (dynamic per token, static per tensor).

Dynamic per token, one program per row m of x [M, K]:
    pass 1: amax = max_k |x[m, k] * smooth_inv[k]|         (BLOCK_K slices, fp32)
            scale[m] = max(amax / 127, eps)                 (div_rn: IEEE, as the reference)
    pass 2: xq[m, k] = rint(clamp(x' / scale[m], -128, 127)) (x re-read, mostly from L2)
Static per tensor: one program per BLOCK_M rows, xq = rint(clamp(x' / scale)), and the
scale handed on per row (NaN where a row holds NaN / inf: see `kernels.reference`).
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
from kernels.validate import static_scale

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
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)  # 1 where x' was NaN or +-inf
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        x = tl.load(x_row + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(smooth_ptr + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        amax = tl.maximum(amax, ax)
        bad = tl.maximum(bad, tl.where(ax < float("inf"), 0, 1))  # NaN < inf is false
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), eps)
    scale = tl.where(tl.max(bad, axis=0) == 0, scale, float("nan"))
    tl.store(scale_ptr + row, scale)

    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        x = tl.load(x_row + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(smooth_ptr + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        q = _codes(x, scale, USE_RINT)
        tl.store(q_row + k0 + rk, q, mask=mask)


@triton.jit
def _codes(x, scale, USE_RINT: tl.constexpr):
    """int8 codes of x' at scale: round_clamp(x' / scale); 0 where x' or scale is not finite
    (as `kernels.reference._codes`, so no backend's NaN -> int8 cast shows)."""
    v = tl.math.div_rn(x, scale)
    ok = (tl.abs(x) < float("inf")) & (v == v)  # v is NaN iff x' or the scale is (scale > 0)
    return round_clamp_int8(tl.where(ok, v, 0.0), USE_RINT)


@triton.jit
def _quant_static_kernel(
    x_ptr, smooth_ptr, xq_ptr, scale_ptr, row_scale_ptr,
    M, K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr, USE_RINT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # one program per BLOCK_M rows, looping over K: codes, and the row's scale (NaN if bad)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rk = tl.arange(0, BLOCK_K)
    s = tl.load(scale_ptr)
    bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + rk < K
        mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + k0 + rk[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(smooth_ptr + k0 + rk, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        bad = tl.maximum(bad, tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1))
        q = _codes(x, s, USE_RINT)
        tl.store(xq_ptr + rm[:, None].to(tl.int64) * stride_qm + k0 + rk[None, :], q, mask=mask)
    tl.store(row_scale_ptr + rm, tl.where(bad == 0, s, float("nan")), mask=mask_m)


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


def quant_static(
    x: torch.Tensor, scale: torch.Tensor | float, smooth_inv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-tensor quant: x [M, K] -> (xq int8 [M, K], x_scale fp32 [M] = scale, NaN in
    rows with a non-finite x'). scale: fp32 1-element tensor or float, finite and > 0.

    Same math as `kernels.reference.quant_static_ref` (bit-exact)."""
    _check_inputs(x, smooth_inv)
    s = static_scale(scale, "scale", x.device)
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    rows = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, rows
    if k == 0:
        return xq, rows.fill_(0.0).add_(s)
    block_m, block_k = (16, 128) if INTERPRETED else (16, 512)
    _quant_static_kernel[(triton.cdiv(m, block_m),)](
        x, smooth_inv if smooth_inv is not None else x, xq, s.reshape(1), rows,
        m, k, x.stride(0), xq.stride(0),
        HAS_SMOOTH=smooth_inv is not None, USE_RINT=not INTERPRETED,
        BLOCK_M=block_m, BLOCK_K=block_k,
    )  # fmt: skip
    return xq, rows


def quant_per_tensor(
    x: torch.Tensor, scale: torch.Tensor | float, smooth_inv: torch.Tensor | None = None
) -> torch.Tensor:
    """The codes of `quant_static`: x [M, K] -> int8 [M, K]."""
    return quant_static(x, scale, smooth_inv)[0]
