"""Pure tensor primitives: integer quantize / dequantize and int4 packing.

Conventions (b = bits):
  symmetric:  q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),  x_hat = q * s,
              s = max|x| / d,  d = `grid_divisor(b, grid)`:
              grid "narrow" d = 2^(b-1) - 1 (2^b - 1 levels used, the default),
              grid "full"   d = 2^(b-1) - 1/2 (all 2^b levels; compressed-tensors)
  asymmetric: q = clamp(round(x / s) + z, 0, 2^b - 1),          x_hat = (q - z) * s,
              s = (max - min) / (2^b - 1), z = round(-min / s)
Granularities, for a weight W [N, K] (out x in) or an activation X [T, K]:
  per_tensor: one s;  per_channel: one s per row (output channel of W);
  per_group:  one s per row and per `group_size` consecutive columns (along K);
  per_token:  one s per row of X (same arithmetic as per_channel).
Rounding is torch.round (half to even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kernels.reference import pack_int4, unpack_int4

Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token"]
Grid = Literal["narrow", "full"]
GRIDS = ("narrow", "full")
EPS = 1e-8

__all__ = [
    "QParams", "qrange", "grid_divisor", "compute_qparams", "quantize", "dequantize", "fake_quantize",
    "pack_int4", "unpack_int4", "quantize_weight", "round_weight", "fake_quantize_weight",
    "recover_codes", "round_weight_two_level",
    "quantize_activation", "fake_quantize_activation",
    "fake_quantize_ste", "fake_quantize_per_token_ste", "fake_quantize_weight_ste",
]


@dataclass(frozen=True)
class QParams:
    """Scale s and zero point z, shaped to broadcast against the grouped tensor.
    Two-level weights (`round_weight_two_level`) also carry scale2, the integer group
    scales s2, with scale = s1 * s2 (s1 per output channel)."""
    scale: Tensor
    zero: Tensor | None     # None: symmetric
    bits: int
    scale2: Tensor | None = None


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def grid_divisor(bits: int, grid: Grid = "narrow") -> float:
    """d in s = max|x| / d of a symmetric b-bit grid (codes clamped to [-2^(b-1), 2^(b-1)-1]).
    narrow: d = 2^(b-1) - 1, max|x| lands on the top code and -2^(b-1) is never used;
    full: d = 2^(b-1) - 1/2 (max|x| / 7.5 at int4, as compressed-tensors / llm-compressor),
    all 2^b levels used, -max|x| lands on -2^(b-1) and +max|x| clamps to 2^(b-1) - 1."""
    if grid == "narrow":
        return 2.0 ** (bits - 1) - 1.0
    if grid == "full":
        return 2.0 ** (bits - 1) - 0.5
    raise ValueError(f"unknown grid {grid!r}; use one of {GRIDS}")


def _grouped(x: Tensor, granularity: Granularity, group_size: int | None) -> Tensor:
    """View x so that the reduction for one scale runs over the last dim."""
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    if granularity in ("per_channel", "per_token"):
        return x.reshape(-1, x.shape[-1])
    if granularity == "per_group":
        k = x.shape[-1]
        if not group_size or k % group_size:
            raise ValueError(f"group_size {group_size} does not divide the input size {k}; "
                             f"choose a divisor of {k} (e.g. 64) or per-channel (-1)")
        return x.reshape(-1, k // group_size, group_size)
    raise ValueError(f"unknown granularity {granularity!r}")


def compute_qparams(x: Tensor, bits: int, symmetric: bool = True,
                    granularity: Granularity = "per_channel", group_size: int | None = None,
                    clip_ratio: float = 1.0, grid: Grid = "narrow") -> QParams:
    """Min-max (optionally clipped) scale per granularity. Shapes broadcast against
    `_grouped(x)`: [1, 1] / [rows, 1] / [rows, groups, 1]. grid: symmetric only."""
    g = _grouped(x.detach().float(), granularity, group_size)
    lo, hi = qrange(bits, symmetric)
    if symmetric:
        amax = g.abs().amax(dim=-1, keepdim=True) * clip_ratio
        return QParams((amax / grid_divisor(bits, grid)).clamp_min(EPS), None, bits)
    xmin = g.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
    xmax = g.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
    scale = ((xmax - xmin) / hi).clamp_min(EPS)
    zero = torch.round(-xmin / scale).clamp(lo, hi)
    return QParams(scale, zero, bits)


def quantize(x: Tensor, qp: QParams, granularity: Granularity = "per_channel",
             group_size: int | None = None) -> Tensor:
    """Integer codes (int32), shaped like x."""
    g = _grouped(x.float(), granularity, group_size)
    lo, hi = qrange(qp.bits, qp.zero is None)
    q = torch.round(g / qp.scale)
    if qp.zero is not None:
        q = q + qp.zero
    return q.clamp(lo, hi).to(torch.int32).reshape(x.shape)


def dequantize(q: Tensor, qp: QParams, granularity: Granularity = "per_channel",
               group_size: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    g = _grouped(q.float(), granularity, group_size)
    if qp.zero is not None:
        g = g - qp.zero
    return (g * qp.scale).reshape(q.shape).to(dtype)


def fake_quantize(x: Tensor, bits: int, symmetric: bool = True,
                  granularity: Granularity = "per_channel", group_size: int | None = None,
                  qp: QParams | None = None, grid: Grid = "narrow") -> Tensor:
    """Quantize-dequantize x; same shape and dtype. qp given: use it (static scales)."""
    qp = qp or compute_qparams(x, bits, symmetric, granularity, group_size, grid=grid)
    return dequantize(quantize(x, qp, granularity, group_size), qp, granularity, group_size,
                      x.dtype)


def weight_granularity(group_size: int | None) -> Granularity:
    return "per_group" if group_size and group_size > 0 else "per_channel"


def quantize_weight(W: Tensor, bits: int, group_size: int | None, symmetric: bool = True,
                    clip_ratio: float = 1.0, grid: Grid = "narrow") -> tuple[Tensor, QParams]:
    """W [N, K] -> (integer codes [N, K] int32, qparams). group_size None/-1: per channel."""
    gran = weight_granularity(group_size)
    qp = compute_qparams(W, bits, symmetric, gran, group_size, clip_ratio, grid)
    return quantize(W, qp, gran, group_size), qp


def round_weight(W: Tensor, bits: int, group_size: int | None, symmetric: bool = True,
                 clip_ratio: float = 1.0, grid: Grid = "narrow") -> tuple[Tensor, QParams]:
    """Round-to-nearest W [N, K] -> (W_hat = (q - z) * s [N, K] in W's dtype, qparams)."""
    q, qp = quantize_weight(W, bits, group_size, symmetric, clip_ratio, grid)
    return dequantize(q, qp, weight_granularity(group_size), group_size, W.dtype), qp


# Two-level weights (QServe / QoQ progressive quantization) at 4 bits: level 1 per output
# channel to int8 with a protective range of +-119, level 2 per group to 4 bits with an
# INTEGER scale s2 (and integer zero point z): q8 = s2 * (q - z) then stays within int8
# (|q8| <= 119 + s2/2 <= 127), so a kernel forms q8 in integer registers and runs one int8
# GEMM over all of K, applying s1 (and the token scale) once per output.
TWO_LEVEL_RANGE = 119
TWO_LEVEL_BITS = 4


def round_weight_two_level(W: Tensor, group_size: int, symmetric: bool = True,
                           clip_ratio: float = 1.0) -> tuple[Tensor, QParams]:
    """W [N, K] -> (W_hat = s1 * s2 * (q - z) in W's dtype, qparams) on the two-level grid.

      s1[n]   = fp16(max|W[n]| * clip_ratio / 119)            per channel (fp16 value, fp32)
      W8      = clamp(round(W / s1), -119, 119)                int8 codes, level 1
      symmetric:  s2 = max(1, round(max|W8_g| / 7)),  q = clamp(round(W8 / s2), -8, 7)
      asymmetric: s2 = max(1, round((max W8_g - min W8_g) / 15)) (range holding 0),
                  z = clamp(round(-min / s2), 0, 15),  q = clamp(round(W8 / s2) + z, 0, 15)
    qparams: scale = s1 * s2 [N, G, 1] (exact in fp32), zero = z, scale2 = s2, bits 4.
    """
    if not group_size or group_size <= 0 or W.shape[-1] % group_size:
        raise ValueError(f"two-level weight scales need a group size dividing K={W.shape[-1]}, "
                         f"got {group_size}")
    n, k = W.shape
    Wf = W.detach().float()
    amax = Wf.abs().amax(dim=1, keepdim=True) * clip_ratio
    s1 = (amax / TWO_LEVEL_RANGE).clamp_min(EPS).to(torch.float16).float()
    s1 = torch.where(s1 > 0, s1, torch.full_like(s1, 2.0 ** -24))  # fp16 flush to 0: smallest
    w8 = torch.round(Wf / s1).clamp(-TWO_LEVEL_RANGE, TWO_LEVEL_RANGE).view(n, k // group_size, group_size)
    lo, hi = qrange(TWO_LEVEL_BITS, symmetric)
    if symmetric:
        s2 = torch.round(w8.abs().amax(dim=-1, keepdim=True) / hi).clamp_min(1)
        zero = None
        q = torch.round(w8 / s2).clamp(lo, hi)
        q8 = q * s2
    else:
        mn = w8.amin(dim=-1, keepdim=True).clamp(max=0)
        mx = w8.amax(dim=-1, keepdim=True).clamp(min=0)
        s2 = torch.round((mx - mn) / hi).clamp_min(1)
        zero = torch.round(-mn / s2).clamp(lo, hi)
        q = (torch.round(w8 / s2) + zero).clamp(lo, hi)
        q8 = (q - zero) * s2
    qp = QParams(s1[:, :, None] * s2, zero, TWO_LEVEL_BITS, scale2=s2)
    return (q8 * s1[:, :, None]).view(n, k).to(W.dtype), qp


def fake_quantize_weight(W: Tensor, bits: int, group_size: int | None,
                         symmetric: bool = True, clip_ratio: float = 1.0,
                         grid: Grid = "narrow") -> Tensor:
    """W_hat of `round_weight` alone."""
    return round_weight(W, bits, group_size, symmetric, clip_ratio, grid)[0]


def quantize_activation(x: Tensor, bits: int, mode: str,
                        static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric activation quantization -> (integer codes q as x.dtype, scale s), x ~ q * s.
    mode: 'static_tensor' (calibrated s, [], on whichever grid it was computed for) or
    'dynamic_token' (s [..., 1] = max|x_row| / (2^(b-1) - 1) per row of x, the narrow grid
    the runtime kernels compute)."""
    lo, hi = qrange(bits, True)
    if mode == "static_tensor":
        if static_scale is None:
            raise ValueError("static per-tensor activation quantization needs a calibrated scale")
        s = static_scale.to(x.dtype)
    elif mode == "dynamic_token":
        s = (x.abs().amax(dim=-1, keepdim=True) / hi).clamp_min(EPS)
    else:
        raise ValueError(f"unknown activation mode {mode!r}")
    return torch.clamp(torch.round(x / s), lo, hi), s


def fake_quantize_activation(x: Tensor, bits: int, mode: str,
                             static_scale: Tensor | None = None) -> Tensor:
    """Symmetric activation fake-quant q * s (see `quantize_activation`)."""
    q, s = quantize_activation(x, bits, mode, static_scale)
    return q * s


def fake_quantize_ste(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Symmetric fake-quant clamp(round(x / s), lo, hi) * s with the straight-through
    estimator: d out / d x = 1 where x lies in [lo * s, hi * s], 0 outside (clipped).
    scale broadcasts against x and gets no gradient (MinMax: it follows x, not learned)."""
    lo, hi = qrange(bits, True)
    s = scale.detach()
    x_c = torch.clamp(x, lo * s, hi * s)
    return x_c + (torch.round(x_c / s) * s - x_c).detach()


def fake_quantize_per_token_ste(x: Tensor, bits: int) -> Tensor:
    """fake_quantize_ste with one MinMax scale per row (last dim): s = max|x_row| / hi."""
    hi = qrange(bits, True)[1]
    return fake_quantize_ste(x, (x.detach().abs().amax(dim=-1, keepdim=True) / hi)
                             .clamp_min(EPS), bits)


def fake_quantize_weight_ste(W: Tensor, bits: int, group_size: int | None) -> Tensor:
    """Symmetric MinMax fake-quant of W [N, K] per output channel (or per group along K)
    with the straight-through estimator; same grid as `quantize_weight(symmetric=True)`."""
    hi = qrange(bits, True)[1]
    g = _grouped(W, weight_granularity(group_size), group_size)
    s = (g.detach().abs().amax(dim=-1, keepdim=True) / hi).clamp_min(EPS)
    return fake_quantize_ste(g, s, bits).reshape(W.shape)


def recover_codes(W_hat: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
                  tol: float | None = None) -> Tensor:
    """Exact integer codes of a weight already on its grid: q = round(W_hat / s) (+ z).

    W_hat [N, K] (any float dtype), scale / zero [N, G] with G | K (G = 1: per channel).
    Raises ValueError when W_hat is off the grid by more than `tol` code steps (default: the
    rounding error of W_hat's dtype at the largest code, plus 0.01) or a code leaves the range.
    """
    n, k = W_hat.shape
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit a weight of shape [{n}, {k}]")
    groups = scale.shape[1]
    v = W_hat.float().view(n, groups, k // groups) / scale.float()[..., None]
    if zero is not None:
        v = v + zero.float()[..., None]
    q = torch.round(v)
    if tol is None:
        tol = min(0.49, 0.01 + 2 ** bits * torch.finfo(W_hat.dtype).eps / 2)
    dev = float((v - q).abs().max()) if q.numel() else 0.0
    if not dev <= tol:
        raise ValueError(f"weights are off their {bits}-bit grid by up to {dev:.3g} steps "
                         f"(tolerance {tol:.3g}): store W_hat = (q - z) * s with the given s")
    lo, hi = qrange(bits, zero is None)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"codes span [{int(q.min())}, {int(q.max())}], outside the {bits}-bit "
                         f"range [{lo}, {hi}]")
    return q.to(torch.int32).view(n, k)


def mse_clip_ratio(x: Tensor, bits: int, symmetric: bool = True,
                   granularity: Granularity = "per_channel", group_size: int | None = None,
                   min_ratio: float = 0.5, n_grid: int = 20, grid: Grid = "narrow") -> Tensor:
    """Per-scale clip ratio r in {1, 1 - 1/n_grid, ..., >= min_ratio} minimising the
    round-trip error ||x - fake_quantize(x, clip r)||^2 of each row / group; shaped like
    compute_qparams' scale, so `compute_qparams(x, ..., clip_ratio=r)` takes it as is."""
    if not 0 < min_ratio <= 1 or n_grid < 1:
        raise ValueError(f"min_ratio={min_ratio} must be in (0, 1] and n_grid={n_grid} >= 1")
    g = _grouped(x.detach().float(), granularity, group_size)
    best_err = best = None
    steps = int(round((1 - min_ratio) * n_grid))
    for i in range(steps + 1):
        r = 1.0 - i / n_grid
        qp = compute_qparams(x, bits, symmetric, granularity, group_size, r, grid)
        lo, hi = qrange(bits, symmetric)
        q = torch.round(g / qp.scale) + (0 if qp.zero is None else qp.zero)
        q = q.clamp(lo, hi) - (0 if qp.zero is None else qp.zero)
        err = (q * qp.scale - g).pow(2).sum(-1, keepdim=True)
        if best is None:
            best_err, best = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(err, r), best)
    return best
