"""Exact PyTorch references for the ptqbench kernels, and the int4 packing layout.

Packing layout (the on-disk and in-memory format of every int4 weight here):
    W_int  int8  [N, K]      values in [-8, 7] (symmetric) or [0, 15] stored as uint
    packed uint8 [N, K // 2] byte j of row n = (W[n, 2j] & 0xF) | (W[n, 2j+1] & 0xF) << 4
i.e. two values per byte along K (the reduction dim), low nibble first. Signed values
are stored as 4-bit two's complement and sign-extended by `unpack_int4`.

Kernel layout (what the W4A8 Triton kernel and the runtime modules hold; `to_kernel_layout`):
K is cut into chunks of C = `kernel_layout_chunk(group_size)` (128, or 64) values, and byte
j < C/2 of chunk c holds W[n, cC + j] (low nibble) and W[n, cC + C/2 + j] (high nibble).
The kernel then multiplies the low nibbles with the activation columns cC .. cC+C/2-1 and
the high nibbles with the next C/2, both plain contiguous loads, instead of splitting the
activation tile into even and odd columns in registers (on an H200 the two ran within 5%
of each other: results/bench/h200/README.md; the layout is kept for the simpler kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.validate import static_scale


def pack_int4(q: Tensor) -> Tensor:
    """[..., K] int in [-8, 7] -> [..., K//2] uint8, low nibble = even index."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 expects signed values in [-8, 7]")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """[..., K//2] uint8 -> [..., K] int8 in [-8, 7] (inverse of `pack_int4`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both)


def kernel_layout_chunk(group_size: int) -> int | None:
    """K-chunk of the kernel weight layout: 128 if it divides group_size, else 64 if that
    does; None (the weight stays in the packing layout, reference path only) otherwise."""
    for chunk in (128, 64):
        if group_size > 0 and group_size % chunk == 0:
            return chunk
    return None


def _swap_chunk_order(packed: Tensor, group_size: int, *, to_kernel: bool) -> Tensor:
    """Reorder the int4 values of each K chunk between K order (packing layout: byte j holds
    values 2j, 2j+1) and halves order (kernel layout: byte j holds values j, C/2 + j)."""
    chunk = kernel_layout_chunk(group_size)
    if chunk is None:
        return packed
    n, half_k = packed.shape
    if (2 * half_k) % chunk:
        raise ValueError(f"K={2 * half_k} is not a multiple of the layout chunk {chunk}")
    w = unpack_int4(packed)  # [N, K]: the nibbles in byte order
    src = (n, -1, 2, chunk // 2) if to_kernel else (n, -1, chunk // 2, 2)
    return pack_int4(w.reshape(src).transpose(-1, -2).reshape(n, -1))


def to_kernel_layout(packed: Tensor, group_size: int) -> Tensor:
    """Packing layout [N, K//2] uint8 -> kernel layout (same shape); identity when
    `kernel_layout_chunk(group_size)` is None."""
    return _swap_chunk_order(packed, group_size, to_kernel=True)


def from_kernel_layout(kpacked: Tensor, group_size: int) -> Tensor:
    """Inverse of `to_kernel_layout`."""
    return _swap_chunk_order(kpacked, group_size, to_kernel=False)


# --------------------------------------------------------------------------------------
# Activation quantization references
# --------------------------------------------------------------------------------------

ACT_SCALE_EPS = 1e-8
"""Lower clamp on dynamic per-token scales: an all-zero row gets scale 1e-8 (not 0), so
`x / scale` is finite and quantizes to 0. The Triton kernel uses the same constant."""

INT8_MAX = 127.0

# Non-finite activations (every backend alike): a row of x' = x * smooth_inv holding a NaN or
# +-inf gets scale NaN (dynamic per token) or its row of the static scale set to NaN, and
# code 0 wherever x' or the scale is not finite; the GEMM epilogue multiplies by that scale,
# so exactly the affected output rows are NaN. Codes never depend on how a backend casts NaN.


def _smoothed(x: Tensor, smooth_inv: Tensor | None) -> Tensor:
    """x' = float32(x) * float32(smooth_inv): one fp32 rounding, as in the kernels."""
    xs = x.to(torch.float32)
    if smooth_inv is not None:
        if smooth_inv.shape != (x.shape[-1],):
            raise ValueError(f"smooth_inv must have shape [{x.shape[-1]}], got {tuple(smooth_inv.shape)}")
        xs = xs * smooth_inv.to(device=x.device, dtype=torch.float32)
    return xs


def _codes(xs: Tensor, scale: Tensor) -> Tensor:
    """int8 codes of x' [M, K] at scale [M, 1] or []: round half to even, clamp to
    [-128, 127] (equal to clamp-then-round: integer bounds); 0 where x' or scale is not finite."""
    ok = torch.isfinite(xs) & torch.isfinite(scale)
    v = torch.where(ok, xs / scale, torch.zeros((), dtype=xs.dtype, device=xs.device))
    return torch.round(v).clamp_(-128, 127).to(torch.int8)


def _finite_rows(xs: Tensor) -> Tensor:
    """bool [M]: rows of x' [M, K] without NaN / inf."""
    return torch.isfinite(xs).all(dim=1)


def quant_per_token_ref(
    x: Tensor, smooth_inv: Tensor | None = None, eps: float = ACT_SCALE_EPS
) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token int8 quantization.

    x [M, K] float, smooth_inv [K] (LAE / SmoothQuant inverse smoothing factors) or None.
    x' = x * smooth_inv;  scale[m] = max(max_k |x'[m, k]| / 127, eps)  (fp32; NaN for a row
    with a non-finite x'), xq = clamp(round_half_even(x' / scale), -128, 127) (0 in such rows).
    Returns (xq int8 [M, K], scale fp32 [M]). All steps are single correctly-rounded fp32 ops,
    so the Triton kernel matches bit for bit.
    """
    if x.dim() != 2:
        raise ValueError(f"quant_per_token_ref expects x [M, K], got shape {tuple(x.shape)}")
    xs = _smoothed(x, smooth_inv)
    amax = xs.abs().amax(dim=1) if xs.shape[1] else xs.new_zeros(xs.shape[0])
    scale = (amax / INT8_MAX).clamp_min(eps)
    scale = torch.where(_finite_rows(xs), scale, torch.full_like(scale, float("nan")))
    return _codes(xs, scale[:, None]), scale


def quant_static_ref(
    x: Tensor, scale: float | Tensor, smooth_inv: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Static symmetric per-tensor int8 quantization with the scale handed on per row:
    (xq = clamp(round(x * smooth_inv / scale)) int8 [M, K], x_scale fp32 [M] = scale, NaN in
    rows with a non-finite x'). `scale` (python float or 1-element tensor, finite and > 0,
    else ValueError) is rounded to fp32 first, as the kernel receives it."""
    if x.dim() != 2:
        raise ValueError(f"quant_static_ref expects x [M, K], got shape {tuple(x.shape)}")
    s = static_scale(scale, "scale", x.device)
    xs = _smoothed(x, smooth_inv)
    rows = torch.where(_finite_rows(xs), s, torch.full((), float("nan"), device=x.device))
    return _codes(xs, s), rows.expand(x.shape[0]).contiguous()


def quant_per_tensor_ref(
    x: Tensor, scale: float | Tensor, smooth_inv: Tensor | None = None
) -> Tensor:
    """The codes of `quant_static_ref`: clamp(round(x * smooth_inv / scale)) int8 [M, K]."""
    return quant_static_ref(x, scale, smooth_inv)[0]


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LLaMA RMSNorm as Hugging Face computes it: h = f32(x) * rsqrt(mean(f32(x)^2) + eps),
    y = weight * h.to(x.dtype)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rmsnorm_quant_ref(
    x: Tensor, weight: Tensor, eps: float, act_scale: float | Tensor | None = None,
    smooth_inv: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm then int8 quantization of its output, the step a fused kernel does in one
    launch: (y [M, K] (the norm's output), xq int8 [M, K], x_scale fp32 [M]); act_scale None:
    dynamic per token, else static (`quant_static_ref`); smooth_inv (LAE / SmoothQuant 1/s)
    multiplies y before quantization."""
    y = rmsnorm_ref(x, weight, eps)
    if act_scale is None:
        return (y, *quant_per_token_ref(y, smooth_inv))
    return (y, *quant_static_ref(y, act_scale, smooth_inv))


# --------------------------------------------------------------------------------------
# Exact integer matmul
# --------------------------------------------------------------------------------------

_FLOAT64_EXACT = 2**53


def _int_mm_ok(a: Tensor, b: Tensor) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    m, k = a.shape
    if a.is_cuda:  # cuBLASLt int8 constraints
        return m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0
    return a.device.type == "cpu" and m <= 8  # CPU _int_mm is slow past GEMV-like sizes


def int_matmul(a: Tensor, b: Tensor, backend: str = "auto") -> Tensor:
    """Exact a @ b.T for int8 a [M, K], b [N, K] -> int32 [M, N].

    backends: "int_mm" (torch._int_mm, int32 accumulate), "int64" (CPU integer matmul),
    "float64" (exact: every product and partial sum is an integer of magnitude
    <= 2**14 * K < 2**53, and fp64 matmul has no TF32/bf16 reduced-precision mode),
    "auto" picks _int_mm where cuBLASLt/oneDNN constraints hold and it is fast, else
    float64. Raises if the int32 result could overflow (K > 131071).
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_matmul expects int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int_matmul shapes mismatch: {tuple(a.shape)} @ {tuple(b.shape)}.T")
    k = a.shape[1]
    if 128 * 128 * k >= 2**31:
        raise ValueError(f"K={k} may overflow the int32 accumulator (max 131071)")
    if backend == "auto":
        backend = "int_mm" if _int_mm_ok(a, b) else "float64"
    if backend == "int_mm":
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    if backend == "int64":
        return (a.to(torch.int64) @ b.to(torch.int64).t()).to(torch.int32)
    if backend == "float64":
        return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32)
    raise ValueError(f"unknown int_matmul backend {backend!r}")


def _grouped_int_matmul(a: Tensor, b: Tensor, group_size: int, backend: str) -> Tensor:
    """Per-group exact products: a [M, Gc*g] int8, b [N, Gc*g] int8 -> int32 [Gc, M, N]."""
    m, k = a.shape
    n, gc = b.shape[0], k // group_size
    if backend == "auto" and not _int_mm_ok(a, b):
        backend = "float64"
    if backend == "float64":  # one batched matmul; exact as in `int_matmul`
        ag = a.to(torch.float64).view(m, gc, group_size).transpose(0, 1)
        bg = b.to(torch.float64).view(n, gc, group_size).permute(1, 2, 0)
        return torch.bmm(ag, bg).to(torch.int32)
    return torch.stack(
        [
            int_matmul(a[:, s : s + group_size], b[:, s : s + group_size], backend)
            for s in range(0, k, group_size)
        ]
    )


# --------------------------------------------------------------------------------------
# GEMM references
# --------------------------------------------------------------------------------------

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_ACC_DTYPES = (torch.float32, torch.float64)


def _check_x_scale(x_scale: Tensor, m: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[M] per-token or [] / [1] per-tensor -> tensor (fp32 values, in `dtype`)
    broadcastable to [M, N] ([1] with M = 1 is per token). A per-tensor scale must be finite
    and > 0 (ValueError); per-row scales may hold NaN (rows of non-finite activations, which
    then come out NaN)."""
    if x_scale.dim() == 0 or (x_scale.shape == (1,) and m != 1):
        return static_scale(x_scale, "x_scale").to(dtype)
    if x_scale.shape != (m,):
        raise ValueError(f"x_scale must have shape [{m}] or [], got {tuple(x_scale.shape)}")
    return x_scale.to(torch.float32).to(dtype)[:, None]


def _epilogue(y: Tensor, x_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """y [M, N] (fp32, or fp64 for acc_dtype=float64) -> (y * x_scale + bias).to(out_dtype),
    in that order (as the kernels)."""
    y = y * _check_x_scale(x_scale, y.shape[0], y.dtype)
    if bias is not None:
        if bias.shape != (y.shape[1],):
            raise ValueError(f"bias must have shape [{y.shape[1]}], got {tuple(bias.shape)}")
        y = y + bias.to(torch.float32).to(y.dtype)
    return y.to(out_dtype)


def _check_acc_dtype(acc_dtype: torch.dtype) -> None:
    if acc_dtype not in _ACC_DTYPES:
        raise TypeError(f"acc_dtype must be one of {_ACC_DTYPES}, got {acc_dtype}")


def w4a8_gemm_ref(
    xq: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    group_size: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    backend: str = "auto",
    acc_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W4A8 GEMM reference: xq int8 [M, K] x int4 weights (packed uint8 [N, K//2]) -> [M, N].

    acc_g[m, n] = sum_{k in group g} xq[m, k] * w[n, k]   (exact int32)
    y = sum_g float32(acc_g) * float32(w_scale[n, g])     (fp32, groups in order)
    y = y * x_scale (per-row [M] or scalar []) + bias, cast to out_dtype.

    acc_dtype float64 runs the scale epilogue (group sum, * x_scale, + bias) in fp64: the
    result is then the exact value rounded once to out_dtype (up to fp64 rounding), i.e.
    independent of summation order. The kernels and the default use fp32 (order-dependent
    ~1e-7 rounding). Only for tests and exactness checks (see docs/checkpoint_format.md).
    """
    if xq.dtype != torch.int8:
        raise TypeError(f"xq must be int8, got {xq.dtype}")
    m, k = xq.shape
    n = w_packed.shape[0]
    if w_packed.shape != (n, k // 2) or k % group_size:
        raise ValueError(
            f"w_packed {tuple(w_packed.shape)} / group_size {group_size} do not fit K={k}"
        )
    n_groups = k // group_size
    if w_scale.shape != (n, n_groups):
        raise ValueError(f"w_scale must have shape [{n}, {n_groups}], got {tuple(w_scale.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    _check_acc_dtype(acc_dtype)
    w = unpack_int4(w_packed)
    ws = w_scale.to(torch.float32).to(acc_dtype)
    y = torch.zeros(m, n, dtype=acc_dtype, device=xq.device)
    # chunk groups so the [Gc, M, N] int32 partials stay under ~64M elements
    chunk = max(1, min(n_groups, (64 * 2**20) // max(1, m * n)))
    for g0 in range(0, n_groups, chunk):
        g1 = min(n_groups, g0 + chunk)
        sl = slice(g0 * group_size, g1 * group_size)
        acc = _grouped_int_matmul(xq[:, sl], w[:, sl], group_size, backend)
        for j in range(g1 - g0):
            y = y + acc[j].to(acc_dtype) * ws[:, g0 + j]
    return _epilogue(y, x_scale, bias, out_dtype)


TWO_LEVEL_MAX_S2 = 17  # level-2 scales s2 in [1, 17]: s2 * (q - z) stays in int8 (see below)


def two_level_int8_weight(w_packed: Tensor, w_scale2: Tensor, w_zero: Tensor | None,
                          group_size: int) -> Tensor:
    """Two-level weight (QServe / QoQ progressive): int8 q8 [N, K] = s2[n, g] * (q[n, k] - z[n, g]).

    w_packed uint8 [N, K//2] (packing layout) signed codes q in [-8, 7]; w_scale2 uint8
    [N, G] integer scales s2; w_zero int8 [N, G] (signed: asymmetric codes stored - 8, as
    the zero) or None (symmetric). ValueError if any q8 leaves [-128, 127] (the quantizer
    keeps |q8| <= 127 by construction: methods.primitives.round_weight_two_level)."""
    n, half_k = w_packed.shape
    k = 2 * half_k
    if k % group_size or w_scale2.shape != (n, k // group_size):
        raise ValueError(f"w_scale2 must have shape [{n}, {k // max(group_size, 1)}], got {tuple(w_scale2.shape)}")
    if w_zero is not None and w_zero.shape != w_scale2.shape:
        raise ValueError(f"w_zero must have shape {tuple(w_scale2.shape)}, got {tuple(w_zero.shape)}")
    q = unpack_int4(w_packed).to(torch.int32).view(n, -1, group_size)
    if w_zero is not None:
        q = q - w_zero.to(torch.int32)[..., None]
    q8 = (q * w_scale2.to(torch.int32)[..., None]).view(n, k)
    if q8.numel() and (int(q8.min()) < -128 or int(q8.max()) > 127):
        raise ValueError("two-level weight s2 * (q - z) leaves the int8 range [-128, 127]")
    return q8.to(torch.int8)


def w4a8_two_level_ref(
    xq: Tensor,
    x_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_scale2: Tensor,
    w_zero: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    backend: str = "auto",
    acc_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W4A8 GEMM with two-level weight scales: one int8 GEMM over all of K.

    q8 = s2 * (q - z) (`two_level_int8_weight`, exact integers), acc = xq @ q8^T in exact
    int32, y = f32(acc) * f32(w_scale[n]) (per output channel, fp16 [N]), then * x_scale,
    + bias, cast (`w8a8_gemm_ref`'s epilogue: the scale is applied once, not per group).
    """
    q8 = two_level_int8_weight(w_packed, w_scale2, w_zero, group_size)
    if w_scale.shape != (w_packed.shape[0],):
        raise ValueError(f"w_scale (per channel) must have shape [{w_packed.shape[0]}], got {tuple(w_scale.shape)}")
    return w8a8_gemm_ref(xq, x_scale, q8, w_scale, bias, out_dtype, backend, acc_dtype)


def w8a8_gemm_ref(
    xq: Tensor,
    x_scale: Tensor,
    wq: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    backend: str = "auto",
    acc_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """W8A8 GEMM reference: y = float32(xq @ wq.T (exact int32)) * w_scale[n] * x_scale + bias.

    xq int8 [M, K], x_scale fp32 [M] or [], wq int8 [N, K], w_scale fp32 [N] (per channel).
    acc_dtype float64: epilogue in fp64, as in `w4a8_gemm_ref`.
    """
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError(f"xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
    if w_scale.shape != (wq.shape[0],):
        raise ValueError(f"w_scale must have shape [{wq.shape[0]}], got {tuple(w_scale.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    _check_acc_dtype(acc_dtype)
    acc = int_matmul(xq, wq, backend)
    y = acc.to(acc_dtype) * w_scale.to(torch.float32).to(acc_dtype)
    return _epilogue(y, x_scale, bias, out_dtype)
