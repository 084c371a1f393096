"""Device dispatch for quantized linears: quantize activations, then GEMM.

On CUDA with triton importable -> Triton kernels; otherwise (CPU, no triton) -> the exact
PyTorch references in `kernels.reference`. `backend="triton"` forces the Triton path
(also on CPU tensors when TRITON_INTERPRET=1 was set before import: used by the tests).
Importing this module needs torch only; Triton modules are imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch
from torch import Tensor

from kernels import reference as ref
from kernels.validate import static_scale

ActMode = Literal["dynamic_token", "static_tensor"]
Backend = Literal["auto", "triton", "reference", "int_mm"]
_FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """True when triton is importable and a CUDA device exists (kernels can compile)."""
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    try:
        import kernels._triton_common  # noqa: F401
    except Exception:  # broken triton install: fall back to references
        return False
    return True


def prepare_w4a8_weight(
    w_packed: Tensor, w_scale: Tensor, group_size: int
) -> tuple[Tensor, Tensor]:
    """Runtime form of a W4A8 weight: (kernel-layout uint8 [N, K//2], scales fp16 [N, K//g]).

    w_packed is in the packing layout (`reference.pack_int4`); the result is in the kernel
    layout (`reference.to_kernel_layout`: halves of 128- or 64-value K chunks share a byte),
    which the Triton kernel reads with plain loads. Group sizes that are not multiples of 64
    keep the packing layout (they run on the reference path). Inverse:
    `reference.from_kernel_layout(w, group_size)`.
    """
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError(f"w_packed must be uint8 [N, K//2], got {w_packed.dtype} {tuple(w_packed.shape)}")
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    if w_scale.shape != (n, k // group_size):
        raise ValueError(f"w_scale must have shape [{n}, {k // group_size}], got {tuple(w_scale.shape)}")
    w = ref.to_kernel_layout(w_packed.contiguous(), group_size)
    return w.contiguous(), w_scale.to(torch.float16).contiguous()


def prepare_two_level_weight(
    w_packed: Tensor, w_scale: Tensor, w_scale2: Tensor, w_zero: Tensor | None, group_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Runtime form of a two-level W4A8 weight: (kernel-layout codes uint8 [N, K//2], s1 fp16
    [N], s2 uint8 [N, K//g], z int8 [N, K//g] or None); w_packed in the packing layout."""
    n = w_packed.shape[0]
    w, _ = prepare_w4a8_weight(w_packed, w_scale2.float(), group_size)  # checks the shapes
    if w_scale.shape != (n,):
        raise ValueError(f"w_scale (per channel) must have shape [{n}], got {tuple(w_scale.shape)}")
    if w_zero is not None and w_zero.shape != w_scale2.shape:
        raise ValueError(f"w_zero must have shape {tuple(w_scale2.shape)}, got {tuple(w_zero.shape)}")
    return (w, w_scale.to(torch.float16).contiguous(), w_scale2.to(torch.uint8).contiguous(),
            None if w_zero is None else w_zero.to(torch.int8).contiguous())


def _use_triton(x: Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "reference", "int_mm"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "triton":
        return True
    return backend == "auto" and x.is_cuda and triton_available()


def _flatten(x: Tensor, k: int) -> tuple[Tensor, tuple[int, ...]]:
    if x.shape[-1] != k:
        raise ValueError(f"x has last dim {x.shape[-1]}, the weight expects K={k}")
    return x.reshape(-1, k).contiguous(), tuple(x.shape[:-1])


def quantize_activations(
    x2d: Tensor,
    act_mode: ActMode = "dynamic_token",
    act_scale: float | Tensor | None = None,
    smooth_inv: Tensor | None = None,
    use_triton: bool = False,
) -> tuple[Tensor, Tensor]:
    """x [M, K] float -> (xq int8 [M, K], x_scale fp32 [M]): the dynamic per-token scales, or
    the static act_scale (finite, > 0, else ValueError) repeated per row; NaN in the rows of x
    holding NaN / inf, so those output rows come out NaN on every backend."""
    if smooth_inv is not None:
        smooth_inv = smooth_inv.to(x2d.device).contiguous()
    if act_mode == "dynamic_token":
        if act_scale is not None:
            raise ValueError("act_scale must be None for act_mode='dynamic_token'")
        if use_triton:
            from kernels.quant_per_token import quant_per_token

            return quant_per_token(x2d, smooth_inv)
        return ref.quant_per_token_ref(x2d, smooth_inv)
    if act_mode == "static_tensor":
        if act_scale is None:
            raise ValueError("act_mode='static_tensor' needs act_scale (calibrated, > 0)")
        s = static_scale(act_scale, "act_scale", x2d.device)
        if use_triton:
            from kernels.quant_per_token import quant_static

            return quant_static(x2d, s, smooth_inv)
        return ref.quant_static_ref(x2d, s, smooth_inv)
    raise ValueError(f"act_mode must be 'dynamic_token' or 'static_tensor', got {act_mode!r}")


def rmsnorm_quantize(
    x2d: Tensor,
    weight: Tensor,
    eps: float,
    act_mode: ActMode = "dynamic_token",
    act_scale: float | Tensor | None = None,
    smooth_inv: Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """LLaMA RMSNorm of x [M, K] and the int8 quantization of its output in one step:
    (y [M, K], xq int8 [M, K], x_scale fp32 [M]), one launch on the Triton path
    (`kernels.rmsnorm_quant`), `reference.rmsnorm_quant_ref` otherwise."""
    if act_mode not in ("dynamic_token", "static_tensor"):
        raise ValueError(f"act_mode must be 'dynamic_token' or 'static_tensor', got {act_mode!r}")
    if (act_mode == "static_tensor") != (act_scale is not None):
        raise ValueError("act_scale is needed for act_mode='static_tensor' and only there")
    if smooth_inv is not None:
        smooth_inv = smooth_inv.to(x2d.device).contiguous()
    if _use_triton(x2d, backend):
        from kernels.rmsnorm_quant import rmsnorm_quant

        return rmsnorm_quant(x2d.contiguous(), weight.contiguous(), eps, act_scale, smooth_inv)
    return ref.rmsnorm_quant_ref(x2d, weight, eps, act_scale, smooth_inv)


def _out_dtype(x: Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is None:
        return x.dtype if x.dtype in _FLOAT_OUT else torch.float16
    return out_dtype


def w4a8_linear(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    group_size: int,
    *,
    act_mode: ActMode = "dynamic_token",
    act_scale: float | Tensor | None = None,
    smooth_inv: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
    quantized: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """y [..., N] = W4A8 linear of x [..., K]: int8 activations, int4 group-wise weights.

    w_packed uint8 [N, K//2] and w_scale [N, K // group_size] as returned by
    `prepare_w4a8_weight` (kernel layout).
    Triton needs group_size % 64 == 0; other group sizes use the reference on any device.
    """
    x2d, lead = _flatten(x, 2 * w_packed.shape[1])
    dtype = _out_dtype(x, out_dtype)
    use_triton = _use_triton(x2d, backend) and (group_size % 64 == 0 or backend == "triton")
    xq, xs = quantized or quantize_activations(x2d, act_mode, act_scale, smooth_inv, use_triton)
    if use_triton:
        from kernels.w4a8_gemm import w4a8_gemm

        y = w4a8_gemm(xq, xs, w_packed, w_scale, group_size, bias, dtype)
    else:
        w_public = ref.from_kernel_layout(w_packed, group_size)
        y = ref.w4a8_gemm_ref(xq, xs, w_public, w_scale, group_size, bias, dtype)
    return y.reshape(*lead, y.shape[-1])


def w4a8_two_level_linear(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_scale2: Tensor,
    w_zero: Tensor | None,
    group_size: int,
    *,
    act_mode: ActMode = "dynamic_token",
    act_scale: float | Tensor | None = None,
    smooth_inv: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
    quantized: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """y [..., N] = W4A8 linear with two-level weight scales (`reference.w4a8_two_level_ref`):
    w_packed uint8 [N, K//2] signed codes (kernel layout, `prepare_w4a8_weight`), w_scale
    fp16 [N] per channel, w_scale2 uint8 [N, K // group_size], w_zero int8 or None.
    Triton needs group_size % 64 == 0; other group sizes use the reference on any device."""
    x2d, lead = _flatten(x, 2 * w_packed.shape[1])
    dtype = _out_dtype(x, out_dtype)
    use_triton = _use_triton(x2d, backend) and (group_size % 64 == 0 or backend == "triton")
    xq, xs = quantized or quantize_activations(x2d, act_mode, act_scale, smooth_inv, use_triton)
    if use_triton:
        from kernels.w4a8_gemm import w4a8_two_level_gemm

        y = w4a8_two_level_gemm(xq, xs, w_packed, w_scale, w_scale2, w_zero, group_size, bias, dtype)
    else:
        w_public = ref.from_kernel_layout(w_packed, group_size)
        y = ref.w4a8_two_level_ref(xq, xs, w_public, w_scale, w_scale2, w_zero, group_size, bias, dtype)
    return y.reshape(*lead, y.shape[-1])


def w8a8_linear(
    x: Tensor,
    wq: Tensor,
    w_scale: Tensor,
    *,
    act_mode: ActMode = "dynamic_token",
    act_scale: float | Tensor | None = None,
    smooth_inv: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
    quantized: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """y [..., N] = W8A8 linear of x [..., K]: wq int8 [N, K], w_scale fp32 [N] per channel.

    backend "int_mm" uses torch._int_mm (CUDA cuBLASLt) for the GEMM."""
    x2d, lead = _flatten(x, wq.shape[1])
    dtype = _out_dtype(x, out_dtype)
    use_triton = _use_triton(x2d, backend)
    xq, xs = quantized or quantize_activations(x2d, act_mode, act_scale, smooth_inv, use_triton or (
        backend == "int_mm" and x2d.is_cuda and triton_available()))  # fmt: skip
    if backend == "int_mm":
        from kernels.w8a8_gemm import w8a8_gemm_torch

        y = w8a8_gemm_torch(xq, xs, wq, w_scale.float(), bias, dtype)
    elif use_triton:
        from kernels.w8a8_gemm import w8a8_gemm

        y = w8a8_gemm(xq, xs, wq, w_scale.float().contiguous(), bias, dtype)
    else:
        y = ref.w8a8_gemm_ref(xq, xs, wq, w_scale, bias, dtype)
    return y.reshape(*lead, y.shape[-1])
