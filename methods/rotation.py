"""Orthogonal transforms as tensor primitives (used by QuIP and QuaRot).

A `Rotation` is an orthogonal n x n matrix kept in factored form,

    R = (F_1 ⊗ F_2 ⊗ ... ⊗ F_r) diag(signs),      F_i orthogonal [f_i, f_i], prod f_i = n,

and applied to the rows of a tensor without forming R: a row v [n] is viewed as a
[f_1, ..., f_r] array and each F_i multiplies its own axis (row-major Kronecker order).

Two constructions:
  randomized Hadamard   signs uniform in {-1, +1}, F_i normalized Hadamard factors
                        (Sylvester 2^k, Paley I / II for the part of n that is not a power of 2)
  Kronecker orthogonal  QuIP's "two-factor" U = U_1 ⊗ U_2, each U_i Haar-random orthogonal
                        with f_i near sqrt(n)

For y = x W^T (x [.., K], W [N, K]) and an orthogonal R [K, K]:
    x -> x R^T  and  W -> W R^T   leave y unchanged   (`apply` on x's rows and W's rows)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_FACTOR = 64          # Sylvester parts are split into factors of at most this order


# ---------------------------------------------------------------- Hadamard matrices (+-1)

def sylvester(n: int) -> Tensor:
    """Hadamard matrix of order n = 2^k (Sylvester: H_2n = [[H, H], [H, -H]]), entries +-1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of 2, got {n}")
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q [q, q], Q_ij = chi(j - i), chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> Tensor:
    """Hadamard matrix of order q + 1 for a prime q = 3 (mod 4): H = I + S,
    S = [[0, 1^T], [-1, Q]] (skew-symmetric since Q is)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    S = torch.zeros(q + 1, q + 1)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(q + 1) + S


def paley2(q: int) -> Tensor:
    """Hadamard matrix of order 2(q + 1) for a prime q = 1 (mod 4): with the symmetric
    conference matrix C = [[0, 1^T], [1, Q]], H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
    C = torch.zeros(q + 1, q + 1)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    A = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1), B)


def _core(m: int) -> Tensor | None:
    """A Hadamard matrix of order m from Paley I or II, [[1]] for m = 1, else None."""
    if m == 1:
        return torch.ones(1, 1)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1)
    return None


def hadamard_factors(n: int) -> list[Tensor]:
    """+-1 Hadamard factors whose Kronecker product is a Hadamard matrix of order n:
    n = m * 2^k with m from Paley I / II (smallest such m), the 2^k part split into
    Sylvester factors of order <= MAX_FACTOR. Raises ValueError when no m is found."""
    if n < 1:
        raise ValueError(f"Hadamard order must be >= 1, got {n}")
    two_k = n & -n
    m = n // two_k
    while True:
        core = _core(m)
        if core is not None:
            break
        if two_k == 1:
            raise ValueError(
                f"no Hadamard matrix of order {n} from Sylvester x Paley constructions; use "
                "rotation=orthogonal (a random orthogonal matrix) for this size")
        m, two_k = m * 2, two_k // 2
    factors = [core] if m > 1 else []
    while two_k > 1:
        f = min(two_k, MAX_FACTOR)
        factors.append(sylvester(f))
        two_k //= f
    return factors or [torch.ones(1, 1)]


def hadamard(n: int) -> Tensor:
    """Dense +-1 Hadamard matrix of order n (H H^T = n I)."""
    H = torch.ones(1, 1)
    for f in hadamard_factors(n):
        H = torch.kron(H, f)
    return H


def random_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    """Haar-random orthogonal [n, n]: QR of a Gaussian with R's diagonal signs moved to Q."""
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return (Q * torch.sign(torch.diagonal(R))[None, :]).float()


# ---------------------------------------------------------------- factored rotations

def kron_rows(x: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
    """Each row v [n] of x [.., n] -> (F_1 ⊗ ... ⊗ F_r) v, without forming the product."""
    sizes = [f.shape[0] for f in factors]
    lead = x.shape[:-1]
    y = x.reshape(-1, *sizes)
    for axis, f in enumerate(factors, start=1):
        y = torch.movedim(torch.movedim(y, axis, -1) @ f.T.to(y.dtype), -1, axis)
    return y.reshape(*lead, -1)


@dataclass(frozen=True)
class Rotation:
    """Orthogonal R = (F_1 ⊗ ... ⊗ F_r) diag(signs) of order n (signs None: all +1)."""

    factors: tuple[Tensor, ...]
    signs: Tensor | None = None
    kind: str = "hadamard"
    # (device, dtype) -> (factors, signs) copies, so an online rotation moves its factors once
    _copies: dict = field(default_factory=dict, compare=False, repr=False)

    def _on(self, like: Tensor) -> tuple[tuple[Tensor, ...], Tensor | None]:
        key = (like.device, like.dtype)
        if key not in self._copies:
            self._copies[key] = (tuple(f.to(like) for f in self.factors),
                                 None if self.signs is None else self.signs.to(like))
        return self._copies[key]

    @property
    def n(self) -> int:
        return math.prod(f.shape[0] for f in self.factors)

    def _compute(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of order {self.n} applied to rows of size {x.shape[-1]}")
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def apply(self, x: Tensor) -> Tensor:
        """Rows v of x [.., n] -> R v, i.e. x R^T (dtype of x; fp32 arithmetic for halves)."""
        y = self._compute(x)
        factors, signs = self._on(y)
        if signs is not None:
            y = y * signs
        return kron_rows(y, factors).to(x.dtype)

    def apply_t(self, x: Tensor) -> Tensor:
        """Rows v of x [.., n] -> R^T v, i.e. x R."""
        y = self._compute(x)
        factors, signs = self._on(y)
        y = kron_rows(y, tuple(f.T for f in factors))
        if signs is not None:
            y = y * signs
        return y.to(x.dtype)

    def conjugate(self, H: Tensor) -> Tensor:
        """R H R^T for a symmetric H [n, n] (the Hessian of inputs x -> R x)."""
        return self.apply(self.apply(H).T)

    def matrix(self) -> Tensor:
        """Dense R [n, n] (tests, small n)."""
        return self.apply(torch.eye(self.n)).T


def random_hadamard(n: int, gen: torch.Generator) -> Rotation:
    """H_n / sqrt(n) diag(signs), signs uniform in {-1, +1} (QuaRot, QuIP#)."""
    factors = tuple(f / math.sqrt(f.shape[0]) for f in hadamard_factors(n))
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return Rotation(factors, signs, "hadamard")


def two_factor_split(n: int) -> tuple[int, int]:
    """n = a * b with a <= b and a the largest divisor of n not above sqrt(n)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def random_kronecker(n: int, gen: torch.Generator) -> Rotation:
    """U_1 ⊗ U_2, each Haar-random orthogonal, orders from `two_factor_split` (QuIP)."""
    a, b = two_factor_split(n)
    factors = tuple(random_orthogonal(k, gen) for k in (a, b) if k > 1) or (torch.ones(1, 1),)
    return Rotation(factors, None, "kronecker")


def random_dense_orthogonal(n: int, gen: torch.Generator) -> Rotation:
    """One Haar-random orthogonal n x n factor (any n)."""
    return Rotation((random_orthogonal(n, gen),), None, "orthogonal")


ROTATIONS = {"hadamard": random_hadamard, "kronecker": random_kronecker,
             "orthogonal": random_dense_orthogonal}


def make_rotation(kind: str, n: int, seed: int) -> Rotation:
    """A seeded rotation of order n: kind in ROTATIONS."""
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation kind {kind!r}; use one of {sorted(ROTATIONS)}")
    return ROTATIONS[kind](n, torch.Generator().manual_seed(seed))


def incoherence(W: Tensor) -> float:
    """max_ij |W_ij| / ||W||_F (QuIP's mu is this times sqrt(N K))."""
    W = W.float()
    return float(W.abs().max() / W.norm())


def excess_kurtosis(x: Tensor) -> Tensor:
    """Per-row kurtosis E[(x - mean)^4] / var^2 - 3 of x [.., n] over its last dim."""
    x = x.float()
    c = x - x.mean(-1, keepdim=True)
    var = c.pow(2).mean(-1)
    return c.pow(4).mean(-1) / var.clamp_min(1e-12).pow(2) - 3.0
