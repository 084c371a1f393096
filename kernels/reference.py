"""Exact PyTorch references for the ptqbench kernels, and the int4 packing layout.

Packing layout (the on-disk and in-memory format of every int4 weight here):
    W_int  int8  [N, K]      values in [-8, 7] (symmetric) or [0, 15] stored as uint
    packed uint8 [N, K // 2] byte j of row n = (W[n, 2j] & 0xF) | (W[n, 2j+1] & 0xF) << 4
i.e. two values per byte along K (the reduction dim), low nibble first. Signed values
are stored as 4-bit two's complement and sign-extended by `unpack_int4`.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
