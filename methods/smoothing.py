"""Fold a per-channel smoothing scale s [K] into the op that produces a linear group's input.

For a group of linears y_i = X W_i^T reading one input X [tokens, K]:

    X' = X / s          (folded into the producer of X: a norm or a linear feeder)
    W_i' = W_i * s      (each consumer's columns, i.e. W_i[:, j] * s_j)
    X' W_i'^T == X W_i^T

Producers (from the family table in methods/arch.py):
  norm,   rmsnorm:          y = x_hat * w             ->  w / s
          rmsnorm_plus_one: y = x_hat * (1 + w)       ->  (1 + w) / s - 1   (Gemma)
          layernorm:        y = x_hat * w + b         ->  w / s, b / s
  linear, feeder F [K_f, K_in] producing X (v_proj -> o_proj, up_proj -> down_proj):
          rows of F.weight (and F.bias) / s. Under grouped-query attention o_proj's input
          channel (h, d) comes from v_proj's row (h // kv_repeat, d), so s must be equal
          across the kv_repeat query heads that share one KV head; `share_across_kv_repeat`
          makes a per-channel statistic (or s) shared, `fold_group_scale` refuses otherwise.
up_proj -> down_proj is exact because act(gate) * (up / s) = (act(gate) * up) / s.

Everything here mutates module weights in place and returns a `FoldResult` that says
whether the fold happened and, if not, why (nothing is changed then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from methods.arch import LinearGroup, ModelSpec, NormKind

S_MIN = 1e-5   # floor on s: a dead channel (max|X_j| = 0) must not divide by zero


@dataclass(frozen=True)
class FoldResult:
    folded: bool
    reason: str | None = None      # why not, when folded is False
    target: str | None = None      # the producer s went into

    def __bool__(self) -> bool:
        return self.folded


# ------------------------------------------------------------------ pure tensor functions
#
# `dtype` is the arithmetic dtype: float32 (the default) computes in fp32 and rounds once
# to the weight's dtype; None computes in the weight's own dtype (s rounded to it first),
# which is how AWQ folds (its scale search scores W * s in the weight dtype).

def _arith(t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return t.dtype if dtype is None else dtype


def fold_norm_params(weight: Tensor, bias: Tensor | None, s: Tensor, kind: NormKind,
                     dtype: torch.dtype | None = torch.float32
                     ) -> tuple[Tensor, Tensor | None]:
    """New (weight, bias) of a norm whose output must become X / s."""
    cd = _arith(weight, dtype)
    s = s.to(device=weight.device, dtype=cd)
    w = weight.to(cd)
    if kind == "rmsnorm":
        new_w = w / s
    elif kind == "rmsnorm_plus_one":
        new_w = (1.0 + w) / s - 1.0
    elif kind == "layernorm":
        new_w = w / s
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    new_b = None if bias is None else bias.to(cd) / s
    return new_w.to(weight.dtype), None if bias is None else new_b.to(bias.dtype)


def scale_columns(W: Tensor, s: Tensor, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """W [N, K] * s [K] along the input dim."""
    cd = _arith(W, dtype)
    return (W.to(cd) * s.to(device=W.device, dtype=cd)[None, :]).to(W.dtype)


def divide_rows(W: Tensor, s: Tensor, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """W [K, K_in] (or a bias [K]) / s [K] along the output dim (one row per channel of X)."""
    cd = _arith(W, dtype)
    s = s.to(device=W.device, dtype=cd)
    return (W.to(cd) / (s[:, None] if W.dim() == 2 else s)).to(W.dtype)


def share_across_kv_repeat(x: Tensor, spec: ModelSpec, reduce: str = "max") -> Tensor:
    """x [num_heads * head_dim] (o_proj input channels) -> max (reduce="mean": mean, as
    AWQ shares its statistics) over the kv_repeat query heads that read the same KV head,
    broadcast back; identity when kv_repeat == 1.
    Apply it to a per-channel statistic before computing s (or to s itself)."""
    r = spec.kv_repeat
    if r == 1:
        return x
    view = x.reshape(spec.num_kv_heads, r, spec.head_dim)
    if reduce == "max":
        shared = view.amax(dim=1, keepdim=True)
    elif reduce == "mean":
        shared = view.mean(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown reduce {reduce!r}; use 'max' or 'mean'")
    return shared.expand_as(view).reshape(x.shape).clone()


def kv_rows_from_o_channels(s: Tensor, spec: ModelSpec) -> Tensor | None:
    """s over o_proj's input [H * d] -> s over v_proj's rows [H_kv * d], or None when s
    is not equal across the kv_repeat heads (the fold would not be exact)."""
    r = spec.kv_repeat
    if r == 1:
        return s
    view = s.reshape(spec.num_kv_heads, r, spec.head_dim)
    if not torch.equal(view, view[:, :1].expand_as(view)):
        return None
    return view[:, 0].reshape(-1)


# ------------------------------------------------------------------ module folds

def fold_reason(group: LinearGroup, spec: ModelSpec, allow_linear_feeders: bool) -> str | None:
    """None when s can be folded into the group's producer, else why not."""
    if group.feeder is None or group.feeder_kind == "none":
        return (f"{group.role}: its input is not a plain module output in the "
                f"{spec.table.family} table (no producer to fold s into)")
    if group.feeder_kind == "linear" and not allow_linear_feeders:
        return (f"{group.role}: folding into the linear feeder {group.feeder} is disabled "
                "(fold_linear_feeders=false)")
    return None


def group_weight_channel_max(block: nn.Module, group: LinearGroup) -> Tensor:
    """max_i max_n |W_i[n, j]| over the group's linears: [K]."""
    cols = [block.get_submodule(n).weight.detach().abs().amax(dim=0).float()
            for n in group.linears]
    return torch.stack(cols).amax(dim=0)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: Tensor, kind: NormKind,
                   dtype: torch.dtype | None = torch.float32) -> None:
    """norm(x) -> norm(x) / s for a per-channel s [K]; in place."""
    w, b = fold_norm_params(norm.weight.data, getattr(norm, "bias", None), s, kind, dtype)
    norm.weight.data = w
    if b is not None:
        norm.bias.data = b


@torch.no_grad()
def fold_into_linear_rows(linear: nn.Linear, s: Tensor,
                          dtype: torch.dtype | None = torch.float32) -> None:
    """linear(x) -> linear(x) / s: output rows (and bias) divided by s [N]; in place."""
    linear.weight.data = divide_rows(linear.weight.data, s, dtype)
    if linear.bias is not None:
        linear.bias.data = divide_rows(linear.bias.data, s, dtype)


@torch.no_grad()
def scale_linear_columns(linear: nn.Linear, s: Tensor,
                         dtype: torch.dtype | None = torch.float32) -> None:
    """W <- W diag(s) (input columns times s [K]); in place."""
    linear.weight.data = scale_columns(linear.weight.data, s, dtype)


@torch.no_grad()
def fold_group_scale(block: nn.Module, group: LinearGroup, s: Tensor, spec: ModelSpec,
                     allow_linear_feeders: bool) -> FoldResult:
    """X / s into the group's producer, W_i * s into each consumer; in place."""
    reason = fold_reason(group, spec, allow_linear_feeders)
    if reason:
        return FoldResult(False, reason)
    s = s.detach().float().clamp_min(S_MIN)
    feeder = block.get_submodule(group.feeder)
    if group.feeder_kind == "norm":
        fold_into_norm(feeder, s, spec.table.norm_kind)
    else:
        rows = s
        if feeder.out_features != s.numel():
            rows = kv_rows_from_o_channels(s, spec)
            if rows is None or rows.numel() != feeder.out_features:
                return FoldResult(False, f"{group.role}: s differs across the {spec.kv_repeat} "
                                  f"query heads sharing a KV head of {group.feeder}; share it "
                                  "with share_across_kv_repeat first")
        fold_into_linear_rows(feeder, rows)
    for name in group.linears:
        scale_linear_columns(block.get_submodule(name), s)
    return FoldResult(True, None, group.feeder)


def needs_kv_sharing(block: nn.Module, group: LinearGroup) -> bool:
    """True when the linear feeder has fewer rows than X has channels (v_proj under GQA)."""
    if group.feeder_kind != "linear" or group.feeder is None:
        return False
    K = block.get_submodule(group.linears[0]).in_features
    return block.get_submodule(group.feeder).out_features != K
