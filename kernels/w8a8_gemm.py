"""W8A8 GEMM in Triton: int8 x int8 -> int32 tensor-core dots, fp32 scale epilogue.

    out[M, N] = float32( sum_k xq[m, k] * wq[n, k] ) * w_scale[n] * x_scale[m] + bias[n]

xq int8 [M, K] row-major, wq int8 [N, K] (nn.Linear orientation, K-major tiles), w_scale
fp32 [N] per output channel, x_scale fp32 [M] (dynamic per token) or [] (static per tensor).

Blocked algorithm: one program per BLOCK_M x BLOCK_N tile (grouped ordering for L2); loop
over its K range in BLOCK_K steps, acc_i += dot(x [BLOCK_M, BLOCK_K], w^T [BLOCK_K, BLOCK_N])
in exact int32 (|acc| <= 2**14 * K, so K <= 131071); epilogue scales by w_scale (row
vector) then x_scale, adds bias, casts, masked store. K need not be a multiple of BLOCK_K
(tail masked with zeros). Decode (M <= 64) splits K over a second grid axis in units of
SPLIT_UNIT columns; fp32 partials are reduced in a fixed order (deterministic).
`w8a8_gemm_torch` is the cuBLASLt alternative (torch._int_mm + the same epilogue in torch).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._triton_common import (
    autotune,
    check_bias,
    check_out_dtype,
    check_tensor,
    check_x_scale,
    launch_splitk_gemm,
    next_pow2,
    require,
)

SPLIT_UNIT = 256  # K columns per split chunk; every BLOCK_K below divides it


@triton.jit
def _w8a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_os, stride_om,
    K_PER_SPLIT, M_BUCKET,
    PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_m)
    pid_n = (pid % num_pid_in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N] (w^T view)

    k_start = pid_k * K_PER_SPLIT
    k_end = min(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = k0 + rk < k_end
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)

    y = acc.to(tl.float32) * tl.load(ws_ptr + rn, mask=mask_n, other=0.0)[None, :]
    if PER_TOKEN:
        y = y * tl.load(xs_ptr + rm, mask=mask_m, other=0.0)[:, None]
    else:
        y = y * tl.load(xs_ptr)
    if HAS_BIAS:
        first_split = (rn * 0 + pid_k) == 0  # tensor mask: interpreter rejects scalar bools
        y = y + tl.load(bias_ptr + rn, mask=mask_n & first_split, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_DECODE_TUNE = [
    triton.Config({"BLOCK_K": bk, "GROUP_M": 1}, num_warps=w, num_stages=s)
    for bk in (64, 128, 256)
    for w in (2, 4)
    for s in (3, 4)
]
_PREFILL_TUNE = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (128, 128, 128, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (64, 128, 128, 4, 4),
        (128, 64, 128, 4, 4),
        (64, 64, 256, 4, 4),
    )
]
_INTERP_CONFIG = {"BLOCK_K": 64, "GROUP_M": 4}


@functools.cache
def _tuned_kernel(mode: str):
    key = ["N", "K", "PER_TOKEN", "HAS_BIAS"]
    if mode == "decode":
        return autotune(_DECODE_TUNE, key + ["BLOCK_M", "BLOCK_N", "K_PER_SPLIT"])(_w8a8_kernel)
    return autotune(_PREFILL_TUNE, key + ["M_BUCKET"])(_w8a8_kernel)


def _check(xq, x_scale, wq, w_scale, bias, out_dtype) -> tuple[int, int, int, bool]:
    check_tensor(xq, "xq", torch.int8, xq.device, 2)
    device = xq.device
    check_tensor(wq, "wq", torch.int8, device, 2)
    m, k = xq.shape
    n = wq.shape[0]
    require(wq.shape[1] == k, f"xq [M, K={k}] and wq [N, K={wq.shape[1]}] disagree on K")
    require(k <= 131071, f"K={k} may overflow the int32 accumulator (max 131071)")
    check_tensor(w_scale, "w_scale", torch.float32, device, 1)
    require(w_scale.shape == (n,), f"w_scale must have shape [{n}], got {tuple(w_scale.shape)}")
    per_token = check_x_scale(x_scale, m, device)
    check_bias(bias, n, device)
    check_out_dtype(out_dtype)
    return m, n, k, per_token


def w8a8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """out [M, N] = xq [M, K] int8 @ wq [N, K]^T int8, scaled by w_scale [N] and x_scale."""
    m, n, k, per_token = _check(xq, x_scale, wq, w_scale, bias, out_dtype)
    device = xq.device
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    chunks = triton.cdiv(k, SPLIT_UNIT)

    def make_args(dest: torch.Tensor, per_split: int, _reduce=None) -> tuple:
        return (
            xq, x_scale, wq, w_scale, bias if bias is not None else w_scale, dest,
            m, n, k,
            xq.stride(0), wq.stride(0), m * n, n,
            per_split * SPLIT_UNIT, next_pow2(m),
        )  # fmt: skip

    meta = {"PER_TOKEN": per_token, "HAS_BIAS": bias is not None}
    return launch_splitk_gemm(out, chunks, split_k, make_args, meta, _w8a8_kernel, _tuned_kernel, _INTERP_CONFIG)


def w8a8_gemm_torch(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Same contract as `w8a8_gemm` via torch._int_mm (cuBLASLt int8) + a torch epilogue.

    cuBLASLt needs M > 16 and K, N multiples of 8: M <= 16 is zero-padded to 32 rows."""
    m, n, k, per_token = _check(xq, x_scale, wq, w_scale, bias, out_dtype)
    require(k % 8 == 0 and n % 8 == 0, f"torch._int_mm needs K and N multiples of 8, got K={k}, N={n}")
    a = xq if m > 16 or not xq.is_cuda else torch.nn.functional.pad(xq, (0, 0, 0, 32 - m))
    acc = torch._int_mm(a, wq.t())[:m]
    y = acc.to(torch.float32) * w_scale
    y = y * (x_scale[:, None] if per_token else x_scale.reshape(()))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)
