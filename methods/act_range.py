"""Static activation ranges: the per-tensor v whose scale s = v / d quantizes X at run time
(d from the symmetric grid, `grid_divisor`), estimated from calibration activations.

    minmax      v = max|X|                                      (exact, the default)
    percentile  v = the p-th percentile of |X| (p = act_percentile, e.g. 99.99)
    mse         v = argmin_c sum_x (x - Q_c(x))^2 over clip ranges c = max|X| * 2^(-k/32),
                k = 0 .. 32 * MSE_OCTAVES (ratios 1 down to 2^-MSE_OCTAVES, 2.2% apart)

Memory: activations are never kept. `AbsHistogram` counts |x| by the top 16 bits of its
float32 bit pattern (8 exponent bits, 7 mantissa bits): 128 bins per factor of two, each
at most 0.78% of its value wide, over the whole float32 range, in a fixed array of 2^15
int64 counts (256 KB) per tensor whatever the number of calibration tokens; binning is a
shift and a bincount. The exact max is kept beside it. Percentiles interpolate linearly
inside a bin; the MSE of a bin is the mean error over SUB_POINTS points spread inside it;
the MSE search is coarse (ratios 2^(-k/8)) then fine (2^(-k/32)) around the best coarse one.
Activations are symmetric: the error of -x is taken equal to that of x (exact for the
narrow grid; the full grid's extra negative code is ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from methods.primitives import Grid, grid_divisor

ActRange = Literal["minmax", "percentile", "mse"]
ACT_RANGES = ("minmax", "percentile", "mse")

BIN_SHIFT = 16                      # float32 bits >> 16: exponent + top 7 mantissa bits
N_BINS = 1 << 15                    # sign bit is 0 for |x|
MSE_OCTAVES = 10
SUB_POINTS = 4


class AbsHistogram:
    """Fixed-size histogram of |x| over float32 bit-pattern bins (see the module docstring);
    lifecycle: add(x) per batch -> percentile / mse_range -> drop the object."""

    def __init__(self) -> None:
        self.counts = torch.zeros(N_BINS, dtype=torch.int64)
        self.max = 0.0
        self.n = 0

    def add(self, x: Tensor) -> None:
        a = x.detach().float().abs().flatten()
        if not a.numel():
            return
        m = float(a.max())
        if not math.isfinite(m):
            raise ValueError(f"non-finite activation {m}: no static range can be estimated")
        idx = a.view(torch.int32) >> BIN_SHIFT
        self.counts += torch.bincount(idx, minlength=N_BINS).cpu()
        self.max = max(self.max, m)
        self.n += a.numel()

    @staticmethod
    def edges(idx: Tensor) -> tuple[Tensor, Tensor]:
        """(lower, upper) value edges of bins idx, float64."""
        lo = (idx.to(torch.int32) << BIN_SHIFT).view(torch.float32).double()
        hi = ((idx.to(torch.int32) + 1) << BIN_SHIFT).view(torch.float32).double()
        return lo, hi

    def percentile(self, p: float) -> float:
        """p-th percentile of |x| (0 < p <= 100), linear interpolation inside its bin."""
        if not 0.0 < p <= 100.0:
            raise ValueError(f"percentile {p} must be in (0, 100]")
        if self.n == 0:
            raise ValueError("empty histogram: no calibration activations were recorded")
        target = p / 100.0 * self.n
        cum = torch.cumsum(self.counts, 0).double()
        b = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))),
                N_BINS - 1)
        lo, hi = self.edges(torch.tensor([b]))
        before = float(cum[b - 1]) if b else 0.0
        frac = (target - before) / max(float(self.counts[b]), 1.0)
        return min(float(lo[0] + frac * (hi[0] - lo[0])), self.max)

    def clip_mse(self, c: Tensor, bits: int, grid: Grid) -> Tensor:
        """Mean squared error of symmetric fake-quant with range c [C] (each): [C]."""
        used = torch.nonzero(self.counts).flatten()
        lo, hi = self.edges(used)
        hi = hi.clamp(max=max(self.max, float(lo.max())))
        w = self.counts[used].double()
        t = (torch.arange(SUB_POINTS, dtype=torch.float64) + 0.5) / SUB_POINTS
        x = lo[:, None] + (hi - lo)[:, None] * t[None, :]                  # [B, P]
        top = 2.0 ** (bits - 1) - 1
        out = []
        for chunk in c.double().split(16):          # [16, B, P] at a time bounds memory
            s = (chunk / grid_divisor(bits, grid))[:, None, None]
            q = torch.clamp(torch.round(x[None] / s), max=top) * s
            out.append((((x[None] - q) ** 2).mean(-1) * w).sum(-1))     # [16]
        return torch.cat(out) / w.sum()

    def mse_range(self, bits: int, grid: Grid) -> float:
        """Clip range minimising the MSE over the ratio grid of the module docstring."""
        if self.n == 0:
            raise ValueError("empty histogram: no calibration activations were recorded")
        if self.max == 0.0:
            return 0.0
        k = torch.arange(8 * MSE_OCTAVES + 1, dtype=torch.float64) * 4       # coarse
        k_best = float(k[int(torch.argmin(self.clip_mse(self.max * 2.0 ** (-k / 32),
                                                        bits, grid)))])
        k = (k_best + torch.arange(-3, 4, dtype=torch.float64)).clamp(0, 32 * MSE_OCTAVES)
        c = self.max * 2.0 ** (-k / 32)                                           # fine
        return float(c[int(torch.argmin(self.clip_mse(c, bits, grid)))])


@dataclass(frozen=True)
class RangeEstimator:
    """The static-range setting of a config: which estimator, and what it needs."""
    kind: ActRange = "minmax"
    percentile: float = 99.99
    bits: int = 8
    grid: Grid = "narrow"

    @property
    def needs_histogram(self) -> bool:
        return self.kind != "minmax"

    def estimate(self, hist: AbsHistogram) -> float:
        if self.kind == "minmax":
            return hist.max
        if self.kind == "percentile":
            return hist.percentile(self.percentile)
        if self.kind == "mse":
            return hist.mse_range(self.bits, self.grid)
        raise ValueError(f"unknown act_range {self.kind!r}; use one of {ACT_RANGES}")
