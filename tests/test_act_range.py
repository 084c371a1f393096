"""Static activation range estimators on synthetic activations with a known answer."""
import math

import pytest
import torch

from methods.act_range import MSE_OCTAVES, AbsHistogram, RangeEstimator
from methods.primitives import fake_quantize_activation, grid_divisor

BIN = 1 / 128                                    # largest relative width of one bin


def _hist(x: torch.Tensor, batches: int = 4) -> AbsHistogram:
    h = AbsHistogram()
    for part in x.chunk(batches):
        h.add(part)
    return h


def _gauss_outliers(seed: int = 0, n: int = 200_000, k: int = 40,
                    size: float = 60.0) -> torch.Tensor:
    """N(0, 1) with k values replaced by +-size (massive activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    idx = torch.randperm(n, generator=g)[:k]
    x[idx] = size * torch.sign(torch.randn(k, generator=g))
    return x


def test_minmax_is_exact_max():
    x = _gauss_outliers()
    assert RangeEstimator("minmax").estimate(_hist(x)) == float(x.abs().max())


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99])
def test_percentile_of_uniform_is_known(p):
    """|x| uniform on [0, 4): the p-th percentile is 4 p / 100 (one bin of tolerance)."""
    x = torch.rand(400_000, generator=torch.Generator().manual_seed(1)) * 4.0
    v = RangeEstimator("percentile", percentile=p).estimate(_hist(x))
    exact = torch.quantile(x.double(), p / 100).item()
    assert abs(v - 4.0 * p / 100) <= 4.0 * p / 100 * BIN + 4.0 * 3 / math.sqrt(x.numel())
    assert abs(v - exact) <= exact * BIN


def test_percentile_100_is_max_and_batches_merge():
    x = _gauss_outliers(2)
    one, many = _hist(x, 1), _hist(x, 16)
    torch.testing.assert_close(one.counts, many.counts)
    assert one.percentile(100.0) == float(x.abs().max())


def _brute_force_mse(x: torch.Tensor, ratios: torch.Tensor, grid: str) -> torch.Tensor:
    """Exact ||Q_c(x) - x||^2 / n of the real quantizer for every clip c = ratio * max|x|."""
    vmax = float(x.abs().max())
    out = []
    for r in ratios.tolist():
        s = torch.tensor(r * vmax / grid_divisor(8, grid))
        out.append(((fake_quantize_activation(x, 8, "static_tensor", s) - x) ** 2).mean())
    return torch.stack(out)


def _heavy_tailed(seed: int = 5, n: int = 100_000) -> torch.Tensor:
    """Gaussian scale mixture N(0, 1) * exp(N(0, 1)): a long tail where clipping pays."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))


@pytest.mark.parametrize("grid", ["narrow", "full"])
@pytest.mark.parametrize("make", [_heavy_tailed, lambda: _gauss_outliers(3, 100_000, 20, 60.0)],
                         ids=["heavy_tailed", "gauss_outliers"])
def test_mse_range_matches_brute_force(grid, make):
    """The histogram's MSE-optimal clip is the brute-force optimum of the real quantizer
    over the same ratio grid (or a neighbour with MSE within 1%)."""
    x = make()
    ratios = 2.0 ** (-torch.arange(32 * MSE_OCTAVES + 1, dtype=torch.float64) / 32)
    exact = _brute_force_mse(x, ratios, grid)
    best = int(torch.argmin(exact))
    v = RangeEstimator("mse", bits=8, grid=grid).estimate(_hist(x))
    chosen = int(torch.argmin((ratios * float(x.abs().max()) - v).abs()))
    assert abs(chosen - best) <= 1
    assert exact[chosen] <= exact[best] * 1.01


def test_mse_clips_a_long_tail():
    """On the heavy tail the optimum is well inside max|x| and beats min-max clearly."""
    x = _heavy_tailed()
    v = RangeEstimator("mse", bits=8).estimate(_hist(x))
    vmax = float(x.abs().max())
    assert v < 0.85 * vmax
    err = _brute_force_mse(x, torch.tensor([v / vmax, 1.0], dtype=torch.float64), "narrow")
    assert err[0] < 0.8 * err[1]


def test_mse_without_outliers_keeps_near_max():
    """Uniform |x|: no clipping helps much; the optimum stays within a few % of max."""
    x = (torch.rand(100_000, generator=torch.Generator().manual_seed(4)) * 2 - 1) * 3.0
    v = RangeEstimator("mse", bits=8).estimate(_hist(x))
    assert 0.95 * 3.0 <= v <= 3.0


def test_histogram_rejects_non_finite():
    with pytest.raises(ValueError, match="non-finite"):
        AbsHistogram().add(torch.tensor([1.0, float("inf")]))
