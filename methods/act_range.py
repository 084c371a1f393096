"""Static activation ranges: the per-tensor v whose scale s = v / d quantizes X at run time
(d from the symmetric grid, `grid_divisor`), estimated from calibration activations.

    minmax      v = max|X|                                      (exact, the default)
    percentile  v = the p-th percentile of |X| (p = act_percentile, e.g. 99.99)
    mse         v = argmin_c sum_x (x - Q_c(x))^2 over clip ranges c = max|X| * 2^(-k/32),
                k = 0 .. 32 * MSE_OCTAVES (ratios 1 down to 2^-MSE_OCTAVES, 2.2% apart)

Memory: activations are never kept. `AbsHistogram` counts |x| in log-spaced bins
(BINS_PER_OCTAVE per factor of two, 0.41% relative width, from 2^MIN_EXP to 2^MAX_EXP;
below: counted as 0, above: not representable in float32 activations of a sane model
and rejected) and keeps the exact max, so its size is fixed (N_BINS int64 per tensor)
whatever the number of calibration tokens. Percentiles interpolate geometrically inside
a bin; the MSE of a bin is the mean error over SUB_POINTS points spread inside it.
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

BINS_PER_OCTAVE = 170
MIN_EXP, MAX_EXP = -24, 24
N_BINS = BINS_PER_OCTAVE * (MAX_EXP - MIN_EXP)
MSE_OCTAVES = 10
SUB_POINTS = 8


class AbsHistogram:
    """Fixed-size histogram of |x| over log-spaced bins (see the module docstring);
    lifecycle: add(x) per batch -> estimate(...) -> drop the object."""

    def __init__(self) -> None:
        self.counts = torch.zeros(N_BINS + 1, dtype=torch.int64)   # [0]: |x| < 2^MIN_EXP
        self.max = 0.0
        self.n = 0

    def add(self, x: Tensor) -> None:
        a = x.detach().abs().float().flatten()
        if not a.numel():
            return
        m = float(a.max())
        if not math.isfinite(m) or m >= 2.0 ** MAX_EXP:
            raise ValueError(f"activation magnitude {m:.3g} is outside the histogram range "
                             f"[0, 2^{MAX_EXP}); use act_range=minmax")
        idx = torch.floor((torch.log2(a.clamp_min(2.0 ** MIN_EXP)) - MIN_EXP)
                          * BINS_PER_OCTAVE).long() + 1
        idx = torch.where(a < 2.0 ** MIN_EXP, torch.zeros_like(idx), idx.clamp(1, N_BINS))
        self.counts += torch.bincount(idx, minlength=N_BINS + 1).cpu()
        self.max = max(self.max, m)
        self.n += a.numel()

    def edges(self) -> tuple[Tensor, Tensor]:
        """(lower, upper) edge of each bin [N_BINS + 1] (bin 0 is [0, 2^MIN_EXP)), float64."""
        k = torch.arange(N_BINS, dtype=torch.float64)
        lo = torch.cat([torch.zeros(1, dtype=torch.float64),
                        2.0 ** (MIN_EXP + k / BINS_PER_OCTAVE)])
        hi = torch.cat([torch.full((1,), 2.0 ** MIN_EXP, dtype=torch.float64),
                        2.0 ** (MIN_EXP + (k + 1) / BINS_PER_OCTAVE)])
        return lo, hi.clamp(max=max(self.max, 2.0 ** MIN_EXP))

    def percentile(self, p: float) -> float:
        """p-th percentile of |x| (0 < p <= 100), geometric interpolation inside its bin."""
        if not 0.0 < p <= 100.0:
            raise ValueError(f"percentile {p} must be in (0, 100]")
        if self.n == 0:
            raise ValueError("empty histogram: no calibration activations were recorded")
        target = p / 100.0 * self.n
        cum = torch.cumsum(self.counts, 0).double()
        b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)))
        b = min(b, N_BINS)
        lo, hi = self.edges()
        before = float(cum[b - 1]) if b else 0.0
        frac = (target - before) / max(float(self.counts[b]), 1.0)
        x_lo, x_hi = float(lo[b]), float(hi[b])
        v = x_lo + frac * (x_hi - x_lo) if b == 0 else x_lo * (x_hi / x_lo) ** frac
        return min(v, self.max)

    def clip_mse(self, c: Tensor, bits: int, grid: Grid) -> Tensor:
        """Mean squared error of symmetric fake-quant with range c [C] (each): [C]."""
        lo, hi = self.edges()
        used = self.counts > 0
        lo, hi, w = lo[used], hi[used], self.counts[used].double()
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
        k = torch.arange(32 * MSE_OCTAVES + 1, dtype=torch.float64)
        c = self.max * 2.0 ** (-k / 32)
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
