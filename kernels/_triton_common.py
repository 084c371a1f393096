"""Shared Triton pieces: interpreter detection, int8 rounding, split-K reduction and the
GEMM launch plan (decode/prefill, split-K, autotuned or interpreter config), checks.

Imports triton at top; the rest of the package only imports this module lazily.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.validate import static_scale

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
RINT_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 to nearest-even in fp32
DECODE_MAX_M = 64  # M <= this: decode tiles (BLOCK_M 16..64) and split-K
MAX_SPLIT_K = 16
DECODE_BLOCK_N = 64
INTERP_BLOCK_N = 32


@triton.jit
def _marker():
    pass


INTERPRETED = type(_marker).__name__ == "InterpretedFunction"
"""True when kernels were decorated under TRITON_INTERPRET=1 (decided at import time)."""


def _tune_bench(fn, quantiles=None):
    """Autotuner timing: short runs (5 ms warm-up, 25 ms measured) so a sweep over many
    shapes tunes in seconds; the benchmark itself times with longer runs."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def autotune(configs: list, key: list[str]):
    """triton.autotune with the short timing above (GPU only; see use_autotune)."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:  # triton >= 3.2
        return triton.autotune(configs=configs, key=key, do_bench=_tune_bench)
    return triton.autotune(configs=configs, key=key)


def use_autotune(device: torch.device) -> bool:
    """Autotune only compiled kernels on a real GPU: it fails under the interpreter."""
    return device.type == "cuda" and not INTERPRETED


@functools.cache
def num_sms(device_index: int | None) -> int:
    if INTERPRETED or not torch.cuda.is_available():
        return 4  # small, so the interpreter tests also exercise split-K
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


@triton.jit
def round_clamp_int8(v, USE_RINT: tl.constexpr):
    """fp32 -> int8: clamp to [-128, 127], then round half to even.

    libdevice.rint (cvt.rni) when compiled; the interpreter has no libdevice, so there the
    1.5 * 2**23 add/sub trick (exact RNE for |v| < 2**22, always true after the clamp).
    """
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    if USE_RINT:
        r = libdevice.rint(v)
    else:
        r = (v + 12582912.0) - 12582912.0
    return r.to(tl.int8)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # ws [SPLIT_K, M*N] fp32 partials -> out [M*N], summed in split order (deterministic)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(ws: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ws [S, M, N] fp32 -> out [M, N] (preallocated, any OUT_DTYPES)."""
    mn = out.numel()
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(mn, block),)](ws, out, mn, SPLIT_K=ws.shape[0], BLOCK=block)
    return out


def pick_split_k(tiles: int, n_chunks: int, device: torch.device, split_k: int | None) -> tuple[int, int]:
    """-> (split, chunks_per_split): enough programs for ~2 waves, whole chunks per split."""
    if split_k is None:
        target = 2 * num_sms(device.index)
        split_k = 1 if tiles >= target else min(MAX_SPLIT_K, triton.cdiv(target, tiles))
    split_k = max(1, min(int(split_k), n_chunks))
    per_split = triton.cdiv(n_chunks, split_k)
    return triton.cdiv(n_chunks, per_split), per_split


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 [>= n] arrival counters for in-kernel split-K reduction, cached per
    device (no allocation or memset per call, so graph capture sees none): the program that
    reduces a tile resets its counter to 0."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def launch_splitk_gemm(
    out: torch.Tensor,
    n_chunks: int,
    split_k: int | None,
    make_args: Callable[..., tuple],
    meta: dict,
    kernel,
    tuned_kernel: Callable[[str], Any],
    interp_meta: dict,
    in_kernel_reduce: bool = False,
    tune_decode_block_n: bool = False,
) -> torch.Tensor:
    """Launch a split-K GEMM kernel writing out [M, N] (M, N > 0), shared by W4A8 / W8A8.

    Decode (M <= DECODE_MAX_M): BLOCK_M = next pow2 >= 16, BLOCK_N fixed, K split in whole
    chunks until ~2 waves of programs; prefill: one split (unless split_k), tile shape
    autotuned (or fixed under the interpreter). make_args(dest, chunks_per_split) builds the
    kernel's positional arguments; tuned_kernel(mode) its autotuned wrapper ("decode" /
    "prefill"); interp_meta the fixed config used without autotuning. fp32 partials
    [split, M, N] are reduced into out in split order: by a second small kernel, or, with
    in_kernel_reduce (the kernel has REDUCE_IN_KERNEL), inside the same launch by the last
    split program to finish each tile (make_args(out, per_split, (ws, counters))).
    tune_decode_block_n: the decode configs carry BLOCK_N (autotuned; the split count is
    chosen for DECODE_BLOCK_N tiles)."""
    m, n = out.shape
    device = out.device
    decode = m <= DECODE_MAX_M
    tuned = use_autotune(device)
    if decode:
        block_m = max(16, next_pow2(m))
        block_n = DECODE_BLOCK_N if tuned else INTERP_BLOCK_N
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        split, per_split = pick_split_k(tiles, n_chunks, device, split_k)
    else:
        block_m, block_n = (None, None) if tuned else (32, INTERP_BLOCK_N)
        split, per_split = pick_split_k(1, n_chunks, device, split_k or 1)
    dest = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=device)
    one_launch = in_kernel_reduce and split > 1
    if one_launch:
        counters = tile_counters(device, triton.cdiv(m, block_m or 16) * triton.cdiv(n, block_n or 16))
        args = make_args(out, per_split, (dest, counters))
        meta = {**meta, "REDUCE_IN_KERNEL": True}
    else:
        args = make_args(dest, per_split, None)
    if tuned and decode and tune_decode_block_n:

        def grid(meta_):
            return (triton.cdiv(m, block_m) * triton.cdiv(n, meta_["BLOCK_N"]), split)

        tuned_kernel("decode")[grid](*args, **meta, BLOCK_M=block_m)
    elif tuned and decode:
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split)
        tuned_kernel("decode")[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
    elif tuned:

        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]), split)

        tuned_kernel("prefill")[grid](*args, **meta)
    else:
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split)
        kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, **interp_meta)
    if split > 1 and not one_launch:
        splitk_reduce(dest, out)
    return out


def require(cond: bool, msg: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(msg)


def check_tensor(
    t: torch.Tensor, name: str, dtype: torch.dtype | tuple, device: torch.device, ndim: int
) -> None:
    """Type, device, rank and contiguity checks with messages naming the argument."""
    require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t)}", TypeError)
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    require(t.dtype in dtypes, f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}", TypeError)
    require(t.device == device, f"{name} is on {t.device}, expected {device}")
    require(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    require(t.is_contiguous(), f"{name} must be contiguous (call .contiguous())")


def check_x_scale(x_scale: torch.Tensor, m: int, device: torch.device) -> bool:
    """Validate x_scale fp32 [M] (per token; NaN marks rows of non-finite activations) or
    [] / [1] (per tensor: finite and > 0; [1] with M = 1 counts as per token); returns per_token."""
    require(isinstance(x_scale, torch.Tensor), "x_scale must be a torch.Tensor", TypeError)
    require(x_scale.dtype == torch.float32, f"x_scale must be float32, got {x_scale.dtype}", TypeError)
    require(x_scale.device == device, f"x_scale is on {x_scale.device}, expected {device}")
    if x_scale.dim() == 0 or (x_scale.shape == (1,) and m != 1):
        static_scale(x_scale, "x_scale")
        return False
    require(x_scale.shape == (m,), f"x_scale must have shape [{m}] or [], got {tuple(x_scale.shape)}")
    require(x_scale.is_contiguous(), "x_scale must be contiguous")
    return True


def check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    require(isinstance(bias, torch.Tensor), "bias must be a torch.Tensor or None", TypeError)
    require(bias.dtype in OUT_DTYPES, f"bias must be a float tensor, got {bias.dtype}", TypeError)
    require(bias.device == device, f"bias is on {bias.device}, expected {device}")
    require(bias.shape == (n,), f"bias must have shape [{n}], got {tuple(bias.shape)}")
    require(bias.is_contiguous(), "bias must be contiguous")


def check_out_dtype(out_dtype: torch.dtype) -> None:
    require(out_dtype in OUT_DTYPES, f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}", TypeError)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())
