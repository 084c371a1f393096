"""W4A8 GEMM in Triton: int8 activations x packed int4 weights, int32 tensor-core dots.

    out[M, N] = x_scale[m] * sum_g ( float32( sum_{k in g} xq[m, k] * w[n, k] ) * w_scale[n, g] ) + bias[n]

Inputs: xq int8 [M, K] row-major; w uint8 [N, K//2] in the *kernel layout*
(`kernels.reference.to_kernel_layout`, made once by `ops.prepare_w4a8_weight`): K is cut into
chunks of C = 128 (or 64) values and byte j of chunk c holds w[n, cC + j] in its low nibble
and w[n, cC + C/2 + j] in its high nibble; w_scale [N, K // group_size]; x_scale fp32 [M]
(dynamic per token) or [] (static per tensor).

Blocked algorithm (one program per BLOCK_M x BLOCK_N output tile, grouped ordering for L2):
  for each chunk c of this program's K range:                       (pipelined runtime loop)
      x_lo = load xq[rm, cC : cC + C/2]        int8 [BLOCK_M, C/2]   contiguous
      x_hi = load xq[rm, cC + C/2 : cC + C]    int8 [BLOCK_M, C/2]   contiguous
      b    = load w[rn, cC/2 : cC/2 + C/2]     uint8 [C/2, BLOCK_N]  (K-major rows)
      lo, hi = sign-extended low / high nibbles of b (four per 32-bit word, in registers)
      acc_i += dot(x_lo, lo) + dot(x_hi, hi)   exact int32 (|acc| <= 1024 * group_size)
      at the last chunk of a weight group g: acc += float32(acc_i) * w_scale[rn, g]; acc_i = 0
  epilogue: acc *= x_scale (row vector or scalar); + bias; cast; store (masked).
The weight stream stays 4 bits per value in global and shared memory. On an H200
(results/bench/h200/README.md) the earlier per-byte shift unpack ran at ~1x cuBLAS fp16 for
decode and 0.5x for prefill, with the packing layout and with this one alike; the 32-bit
unpack brought 1.5-1.9x and 0.7x.

Configs: decode (M <= 64) uses BLOCK_M = 16..64 and splits the weight groups over a second
grid axis (split-K) until ~2 waves of programs exist; fp32 partials [SPLIT_K, M, N] are summed
in split order by the last program of each tile to arrive (an atomic counter elects it; the
sum itself is deterministic), in the same launch. Prefill (M > 64)
uses large tiles and no split. Autotuning (warps, stages, and the tile shape for prefill)
runs only for compiled kernels on a GPU; under TRITON_INTERPRET=1 one small fixed config is
used. An int8 dot needs K >= 32 per operand half, so group_size must be a multiple of 64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._triton_common import (
    INTERPRETED,
    autotune,
    check_bias,
    check_out_dtype,
    check_tensor,
    check_x_scale,
    launch_splitk_gemm,
    next_pow2,
    require,
)
from kernels.reference import kernel_layout_chunk

MIN_GROUP = 64

# Sign-extend the low / high nibble of each byte of a 32-bit word into four int8s:
# t = 4-bit fields (0..15) in the low half of each byte; (t & 0x08) * 30 = 0xF0 sets the
# upper half of the bytes whose field is negative (no carries: 240 < 256).
_NIBBLE_ASM = """{{
.reg .b32 t, m;
{shift}
and.b32 t, t, 0x0F0F0F0F;
and.b32 m, t, 0x08080808;
mul.lo.u32 m, m, 30;
or.b32 $0, t, m;
}}"""
_LO_ASM = tl.constexpr(_NIBBLE_ASM.format(shift="mov.b32 t, $1;"))
_HI_ASM = tl.constexpr(_NIBBLE_ASM.format(shift="shr.u32 t, $1, 4;"))


@triton.jit
def _unpack_nibbles(b, FAST: tl.constexpr):
    """uint8 [R, C] -> (int8 low nibbles, int8 high nibbles), sign-extended.

    FAST (compiled): 32-bit word ops on four bytes at once (inline PTX; ~5 instructions per
    8 values); otherwise (interpreter, which runs no PTX) per-byte arithmetic shifts, which
    compile to byte permutes and cost ~7 instructions per value."""
    if FAST:
        lo = tl.inline_asm_elementwise(_LO_ASM, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_HI_ASM, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = (b << 4).to(tl.int8) >> 4
        hi = b.to(tl.int8) >> 4
    return lo, hi


@triton.jit
def _w4a8_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, ws2_ptr, wz_ptr, bias_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_s2n, stride_os, stride_om,
    GROUPS_PER_SPLIT, M_BUCKET,
    GROUP_SIZE: tl.constexpr, CHUNK: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    TWO_LEVEL: tl.constexpr = False, HAS_ZERO: tl.constexpr = False,
    REDUCE_IN_KERNEL: tl.constexpr = False,
    FAST_UNPACK: tl.constexpr = False,
    SKIP_UNPACK: tl.constexpr = False, SKIP_RESCALE: tl.constexpr = False,
):  # fmt: skip
    # SKIP_* are profiling switches set only by kernels.ablate (wrong results when set):
    # SKIP_UNPACK feeds the packed bytes to both dots as int8; SKIP_RESCALE keeps one int32
    # accumulator over the whole K range with one rescale at the end.
    # TWO_LEVEL: ws = per-channel scales [N], ws2 = integer group scales s2 uint8 [N, G],
    # wz = zero points int8 [N, G] (HAS_ZERO): q8 = s2 * (q - z) formed in registers, one
    # int32 accumulator over the split's whole K range, ws applied once in the epilogue
    # -- tile coordinates: grouped ordering of (pid_m, pid_n) for L2 reuse; axis 1 = split-K
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_m)
    pid_n = (pid % num_pid_in_group) // group_m

    HALF: tl.constexpr = CHUNK // 2
    CHUNKS_PER_GROUP: tl.constexpr = GROUP_SIZE // CHUNK
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rh = tl.arange(0, HALF)
    # K is a multiple of GROUP_SIZE, hence of CHUNK: only M / N edges need masks
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rh[None, :]  # [BLOCK_M, HALF]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rh[:, None]  # [HALF, BLOCK_N] bytes
    x_mask = mask_m[:, None]
    w_mask = mask_n[None, :]

    n_chunks = K // CHUNK
    c_start = pid_k * GROUPS_PER_SPLIT * CHUNKS_PER_GROUP  # splits hold whole groups
    c_end = min(c_start + GROUPS_PER_SPLIT * CHUNKS_PER_GROUP, n_chunks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for c in range(c_start, c_end):
        x_lo = tl.load(x_ptrs + c * CHUNK, mask=x_mask, other=0)
        x_hi = tl.load(x_ptrs + c * CHUNK + HALF, mask=x_mask, other=0)
        b = tl.load(w_ptrs + c * HALF, mask=w_mask, other=0)
        if SKIP_UNPACK:
            lo = b.to(tl.int8)
            hi = lo
        else:  # lo = w[n, cC + j], hi = w[n, cC + HALF + j]
            lo, hi = _unpack_nibbles(b, FAST_UNPACK)
        g = c // CHUNKS_PER_GROUP
        if TWO_LEVEL:
            s2 = tl.load(ws2_ptr + rn * stride_s2n + g, mask=mask_n, other=0).to(tl.int16)
            lo16 = lo.to(tl.int16)
            hi16 = hi.to(tl.int16)
            if HAS_ZERO:
                z = tl.load(wz_ptr + rn * stride_s2n + g, mask=mask_n, other=0).to(tl.int16)
                lo16 = lo16 - z[None, :]
                hi16 = hi16 - z[None, :]
            lo = (lo16 * s2[None, :]).to(tl.int8)  # |s2 * (q - z)| <= 127 by construction
            hi = (hi16 * s2[None, :]).to(tl.int8)
            acc_i = tl.dot(x_lo, lo, acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(x_hi, hi, acc_i, out_dtype=tl.int32)
        elif SKIP_RESCALE:
            acc_i = tl.dot(x_lo, lo, acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(x_hi, hi, acc_i, out_dtype=tl.int32)
        elif CHUNKS_PER_GROUP == 1:
            acc_i = tl.dot(x_lo, lo, out_dtype=tl.int32)
            acc_i = tl.dot(x_hi, hi, acc_i, out_dtype=tl.int32)
            s = tl.load(ws_ptr + rn * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
            acc += acc_i.to(tl.float32) * s[None, :]
        else:  # several chunks per group: rescale once, at the group's last chunk
            acc_i = tl.dot(x_lo, lo, acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(x_hi, hi, acc_i, out_dtype=tl.int32)
            last = (rn * 0 + c % CHUNKS_PER_GROUP) == CHUNKS_PER_GROUP - 1  # [BLOCK_N]
            s = tl.load(ws_ptr + rn * stride_sn + g, mask=mask_n & last, other=0.0).to(tl.float32)
            acc += acc_i.to(tl.float32) * s[None, :]
            acc_i = tl.where(last[None, :], 0, acc_i)

    if TWO_LEVEL:
        s = tl.load(ws_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc_i.to(tl.float32) * s[None, :]
    elif SKIP_RESCALE:
        s = tl.load(ws_ptr + rn * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc_i.to(tl.float32) * s[None, :]

    # -- epilogue: activation scale, bias (added by split 0 only), cast, masked store
    if PER_TOKEN:
        xs = tl.load(xs_ptr + rm, mask=mask_m, other=0.0)
        acc = acc * xs[:, None]
    else:
        acc = acc * tl.load(xs_ptr)
    if HAS_BIAS:
        # (rn * 0 + pid_k): a tensor, since the interpreter rejects `mask & scalar-bool`
        first_split = (rn * 0 + pid_k) == 0
        bias = tl.load(bias_ptr + rn, mask=mask_n & first_split, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    offs = rm[:, None] * stride_om + rn[None, :]
    if REDUCE_IN_KERNEL:
        # split-K in one launch: fp32 partial to part[pid_k]; the last split program of this
        # tile to arrive sums the partials in split order (as splitk_reduce: deterministic)
        tl.store(part_ptr + pid_k * stride_os + offs, acc, mask=mask_out)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1)  # acq_rel: our partial is visible first
        tl.debug_barrier()
        if arrived == tl.num_programs(1) - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):
                total += tl.load(part_ptr + s * stride_os + offs, mask=mask_out, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next launch
    else:
        tl.store(out_ptr + pid_k * stride_os + offs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

# decode: BLOCK_M / split-K picked by the wrapper; tune the pipeline and the N tile (wider
# tiles: more weight bytes in flight per program at M <= 16)
_DECODE_TUNE = [
    triton.Config({"GROUP_M": 1, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn in (64, 128)
    for w in (2, 4)
    for s in (2, 3, 4, 5)
]
# prefill: tile shape (BLOCK_M, BLOCK_N, GROUP_M, warps, stages)
_PREFILL_TUNE = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in (
        (128, 128, 8, 3),
        (128, 128, 4, 4),
        (128, 256, 8, 3),
        (256, 128, 8, 3),
        (64, 128, 4, 4),
        (128, 64, 4, 4),
        (64, 64, 4, 5),
        (64, 256, 8, 3),
    )
]
# interpreter / CPU: one small fixed config (dots still >= 16 x 16 x 32, as the GPU needs)
_INTERP_CONFIG = {"GROUP_M": 4}


@functools.cache
def _tuned_kernel(mode: str):
    """Autotuned wrapper of `_w4a8_kernel` for decode or prefill launches."""
    configs = _DECODE_TUNE if mode == "decode" else _PREFILL_TUNE
    key = ["N", "K", "GROUP_SIZE", "PER_TOKEN", "HAS_BIAS", "TWO_LEVEL", "HAS_ZERO", "FAST_UNPACK",
           "SKIP_UNPACK", "SKIP_RESCALE", "REDUCE_IN_KERNEL"]
    key += ["BLOCK_M", "GROUPS_PER_SPLIT"] if mode == "decode" else ["M_BUCKET"]
    return autotune(configs, key)(_w4a8_kernel)


def check_w4a8_weight(w_packed: torch.Tensor, w_scale: torch.Tensor, group_size: int, device: torch.device) -> tuple[int, int]:
    """Validate a kernel-layout weight + group scales [N, K // group_size]; returns (N, K)."""
    n, k = _check_packed(w_packed, group_size, device)
    check_tensor(w_scale, "w_scale", _SCALE_DTYPES, device, 2)
    require(w_scale.shape == (n, k // group_size),
            f"w_scale must have shape [{n}, {k // group_size}] (N, K // group_size), got {tuple(w_scale.shape)}")  # fmt: skip
    return n, k


def check_two_level_weight(w_packed, w_scale, w_scale2, w_zero, group_size, device) -> tuple[int, int]:
    """Validate a two-level weight: kernel-layout codes, per-channel w_scale [N], integer
    group scales w_scale2 uint8 [N, G], zero points w_zero int8 [N, G] or None."""
    n, k = _check_packed(w_packed, group_size, device)
    check_tensor(w_scale, "w_scale", _SCALE_DTYPES, device, 1)
    require(w_scale.shape == (n,), f"w_scale (per channel) must have shape [{n}], got {tuple(w_scale.shape)}")
    check_tensor(w_scale2, "w_scale2", torch.uint8, device, 2)
    require(w_scale2.shape == (n, k // group_size),
            f"w_scale2 must have shape [{n}, {k // group_size}], got {tuple(w_scale2.shape)}")
    if w_zero is not None:
        check_tensor(w_zero, "w_zero", torch.int8, device, 2)
        require(w_zero.shape == w_scale2.shape, f"w_zero must have shape {tuple(w_scale2.shape)}, got {tuple(w_zero.shape)}")
    return n, k


_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_packed(w_packed: torch.Tensor, group_size: int, device: torch.device) -> tuple[int, int]:
    check_tensor(w_packed, "w_packed", torch.uint8, device, 2)
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    require(isinstance(group_size, int) and group_size >= MIN_GROUP and group_size % MIN_GROUP == 0,
            f"group_size must be a positive multiple of {MIN_GROUP} for the Triton kernel, got {group_size}")  # fmt: skip
    require(k % group_size == 0, f"K={k} is not a multiple of group_size={group_size}")
    return n, k


def w4a8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """out [M, N] = (xq [M, K] int8 @ int4 weights) with group, activation scales and bias.

    x_scale fp32 [M] (per token) or [] (per tensor); w_packed uint8 [N, K//2] in the kernel
    layout (`ops.prepare_w4a8_weight`, `reference.to_kernel_layout`); w_scale
    fp16/bf16/fp32 [N, K // group_size]; bias [N] or None; out_dtype fp16 / bf16 / fp32.
    split_k: force the number of K splits (None: heuristic; only used for M <= 64).
    """
    return launch_w4a8(xq, x_scale, w_packed, w_scale, group_size, bias, out_dtype, split_k, {})


def w4a8_two_level_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_scale2: torch.Tensor,
    w_zero: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """out [M, N] = f32(xq @ q8^T) * w_scale[n] * x_scale (+ bias), q8 = s2 * (q - z).

    Two-level weights (QServe progressive): w_packed uint8 [N, K//2] signed codes in the
    kernel layout; w_scale fp16 [N] per output channel; w_scale2 uint8 [N, K // group_size]
    integer group scales; w_zero int8 [N, K // group_size] or None. One int32 accumulator over
    each split's K range; no per-group float rescale (`reference.w4a8_two_level_ref`)."""
    return launch_w4a8(xq, x_scale, w_packed, w_scale, group_size, bias, out_dtype, split_k, {},
                       w_scale2=w_scale2, w_zero=w_zero)  # fmt: skip


def launch_w4a8(xq, x_scale, w_packed, w_scale, group_size, bias, out_dtype, split_k,
                flags: dict, *, w_scale2=None, w_zero=None) -> torch.Tensor:  # fmt: skip
    """`w4a8_gemm` (or, with w_scale2, `w4a8_two_level_gemm`) with extra kernel constexprs
    `flags` (kernels.ablate: SKIP_UNPACK, SKIP_RESCALE, FAST_UNPACK=False; and
    in_kernel_reduce=False: split-K partials summed by a second launch); the production
    wrappers pass none."""
    check_tensor(xq, "xq", torch.int8, xq.device, 2)
    device = xq.device
    m, kx = xq.shape
    two_level = w_scale2 is not None
    if two_level:
        n, k = check_two_level_weight(w_packed, w_scale, w_scale2, w_zero, group_size, device)
    else:
        n, k = check_w4a8_weight(w_packed, w_scale, group_size, device)
    require(kx == k, f"xq has K={kx} but w_packed [N, K//2] implies K={k}")
    per_token = check_x_scale(x_scale, m, device)
    check_bias(bias, n, device)
    check_out_dtype(out_dtype)

    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out
    n_groups = k // group_size
    ws2 = w_scale2 if two_level else w_packed
    wz = w_zero if w_zero is not None else w_packed

    def make_args(dest: torch.Tensor, per_split: int, reduce=None) -> tuple:
        part, counters = reduce if reduce is not None else (dest, x_scale)
        return (
            xq, x_scale, w_packed, w_scale, ws2, wz, bias if bias is not None else x_scale, dest,
            part, counters,
            m, n, k,
            xq.stride(0), w_packed.stride(0), w_scale.stride(0), ws2.stride(0), m * n, n,
            per_split, next_pow2(m),
        )  # fmt: skip

    flags = dict(flags)
    one_launch = flags.pop("in_kernel_reduce", True)
    meta = {"GROUP_SIZE": group_size, "CHUNK": kernel_layout_chunk(group_size),
            "PER_TOKEN": per_token, "HAS_BIAS": bias is not None,
            "TWO_LEVEL": two_level, "HAS_ZERO": w_zero is not None,
            "FAST_UNPACK": not INTERPRETED, **flags}  # fmt: skip
    return launch_splitk_gemm(
        out, n_groups, split_k, make_args, meta, _w4a8_kernel,
        _tuned_kernel, {**_INTERP_CONFIG, "num_warps": 4}, in_kernel_reduce=one_launch,
        tune_decode_block_n=True,
    )  # fmt: skip
