"""QuIP (Chee et al., 2023, "QuIP: 2-Bit Quantization of Large Language Models With
Guarantees", arXiv 2307.13304): incoherence processing around LDLQ rounding.

For one linear W [N, K] with proxy Hessian H [K, K] (H = 2/n sum_t x_t x_t^T, as GPTQ):

  1. damp       H <- H + damp * mean(diag H) I
  2. rescale    s = (diag H / diag W^T W)^(1/4);  W <- W diag(s),  H <- diag(s)^-1 H diag(s)^-1
  3. incoherence  W <- U W V^T,  H <- V H V^T   U [N, N], V [K, K] seeded random orthogonal
                (Kronecker two-factor, the paper's, or randomized Hadamard, QuIP#'s)
  4. LDLQ       round W against H column by column with linear feedback from the LDL
                factor of H; Theorem 6 of the paper: LDLQ is OPTQ, so the GPTQ solver
                (methods/gptq.py) does it, on the processed W and H
  5. undo       W_tilde = U^T W_hat V diag(s)^-1; the simulated model computes x W_tilde^T

Steps 2-3 make W and H incoherent (small max|W_ij| / ||W||_F, no dominant directions),
which is what makes a 2-bit grid usable. The grid is per channel / group in the processed
basis, min-max or MSE-clipped (the paper clips at rho * ||W||_F / sqrt(N K) per tensor).
U, V are regenerated from (seed, linear name); only s [K] is stored beside the codes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from methods.base import ConfigError, LinearStats, register
from methods.gptq import GPTQ, GPTQConfig, GPTQSolver
from methods.layers import FakeQuantLinear, round_and_wrap
from methods.rotation import ROTATIONS, Rotation, incoherence, make_rotation
from methods.transformed import TransformedLinear

Incoherence = Literal["kronecker", "hadamard", "none"]


@dataclass(frozen=True)
class QuIPConfig(GPTQConfig):
    group_size: int | None = None        # the paper: one scale per tensor; here per channel
    symmetric: bool = False
    act_order: bool = False              # LDLQ runs in the natural column order
    incoherence: Incoherence = "kronecker"
    rescale: bool = True                 # step 2, the diagonal rescaling D
    mse_clip: bool = True                # grid range per group by round-trip MSE (else min-max)
    seed: int = 0
    solver_damp: float = 1e-6            # the solver's own jitter after step 1's damping

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.incoherence not in (*ROTATIONS, "none") or self.incoherence == "orthogonal":
            raise ConfigError(f"quip incoherence={self.incoherence!r}; use kronecker (paper), "
                              "hadamard (randomized Hadamard, QuIP#) or none (plain LDLQ)")
        if not self.solver_damp > 0:
            raise ConfigError(f"quip solver_damp={self.solver_damp} must be > 0")
        if self.quantizes_activations:
            raise ConfigError(f"quip quantizes weights only (a_bits={self.a_bits}); use "
                              "bits=w2a16, w3a16 or w4a16")


@dataclass
class Incoherent:
    """Processed W, H and the transforms that undo them."""
    W: Tensor                   # [N, K] = U (W diag(s)) V^T
    H: Tensor                   # [K, K] = V diag(s)^-1 (H + damp) diag(s)^-1 V^T
    s: Tensor | None            # [K]
    U: Rotation | None          # [N, N]
    V: Rotation | None          # [K, K]


def rescale_vector(W: Tensor, H: Tensor, eps: float = 1e-8) -> Tensor:
    """s = (diag H / diag W^T W)^(1/4) [K]: equalises column norms of W and diag H."""
    dH = torch.diag(H).clamp_min(eps)
    dW = W.float().pow(2).sum(0).clamp_min(eps)
    return (dH / dW).pow(0.25)


@torch.no_grad()
def process(W: Tensor, H: Tensor, damp: float, rescale: bool, kind: Incoherence, seed: int
            ) -> Incoherent:
    """Steps 1-3 on W [N, K] and H [K, K] (fp32)."""
    N, K = W.shape
    W, H = W.float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * float(torch.diag(H).mean()) * torch.eye(K, dtype=H.dtype, device=H.device)
    s = None
    if rescale:
        s = rescale_vector(W, H)
        W = W * s[None, :]
        H = H / s[:, None] / s[None, :]
    U = V = None
    if kind != "none":
        U, V = make_rotation(kind, N, seed), make_rotation(kind, K, seed + 1)
        W = U.apply(V.apply(W).T).T                     # U W V^T
        H = V.conjugate(H)
    return Incoherent(W, H, s, U, V)


def linear_seed(seed: int, name: str) -> int:
    """A stable per-linear seed (same transforms on every run and machine)."""
    return seed * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003


@register(QuIPConfig)
class QuIP(GPTQ):
    """GPTQ's block walk (true-sequential Hessians on quantized predecessors) with each
    linear rounded by LDLQ in its incoherent basis."""

    name = "quip"
    supported_bits = frozenset({(2, 16), (3, 16), (4, 16), (8, 16)})
    cacheable = False                  # TransformedLinear is outside the cache's layout

    def quantize_linear(self, linear: nn.Linear, H: Tensor, n: int, stats: LinearStats,
                        cfg: QuIPConfig | None = None, name: str = ""
                        ) -> tuple[FakeQuantLinear, dict[str, Any]]:
        c: QuIPConfig = cfg or self.config
        W0 = linear.weight.data
        inc = process(W0, H, c.damp, c.rescale, c.incoherence, linear_seed(c.seed, name))
        solver = GPTQSolver(inc.W)
        solver.set_hessian(inc.H, n)
        W_hat, qp, info = solver.solve(c.w_bits, c.group_size, c.symmetric, c.act_order,
                                       c.static_groups, c.block_size, c.solver_damp,
                                       c.max_damp_retries, mse_clip=c.mse_clip)
        solver.free()
        info.update(incoherence_before=incoherence(W0), incoherence_after=incoherence(inc.W))
        fq = round_and_wrap(_with_weight(linear, inc.W), c, solved=(W_hat, qp))
        s_inv = None if inc.s is None else 1.0 / inc.s
        return TransformedLinear(fq, r_in=inc.V, r_out=inc.U, smooth_inv=s_inv), info


def _with_weight(linear: nn.Linear, W: Tensor) -> nn.Linear:
    """A copy of `linear` (same bias) holding weight W."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=W.device, dtype=linear.weight.dtype)
    out.weight.data = W.to(linear.weight.dtype)
    if linear.bias is not None:
        out.bias.data = linear.bias.data.clone()
    return out

