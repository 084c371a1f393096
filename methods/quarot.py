"""QuaRot-style rotation baseline (Ashkboos et al., 2024, "QuaRot: Outlier-Free 4-Bit
Inference in Rotated LLMs", arXiv 2404.00456) for W4A8 / W4A4.

With h the residual stream and R [d, d] a randomized Hadamard (or random orthogonal)
matrix, the model is rewritten to carry h' = R h, exactly:

  1. fold     each RMSNorm scale w into the columns of the linears it feeds:
              W_i <- W_i diag(w), w <- 1 (final norm into lm_head; a tied lm_head is untied)
  2. rotate   embedding rows e <- R e; readers of the stream (q/k/v, gate/up, lm_head)
              W <- W R^T; writers (o_proj, down_proj) W <- R W, b <- R b.
              RMSNorm(R h) = R RMSNorm(h) once w = 1, so logits are unchanged.
  3. online   down_proj's input x -> R_d x with W_down <- W_down R_d^T (R_d a Hadamard of
              the intermediate size, applied in the forward); optionally o_proj's input too
              (online_heads). These inputs are not on the residual stream, so no fold exists.
  4. quantize activations per token (dynamic) and weights by RTN (MSE-clipped range) or
              the GPTQ solver (Hessians of the rotated inputs: R_d H R_d^T for down_proj).

The rotation spreads outlier channels over all channels: per-token kurtosis and
max/mean |x| of the linear inputs drop, so a per-token 4/8-bit grid loses less.
Families: RMSNorm only (llama, qwen2). LayerNorm's mean subtraction does not commute with
R (OPT, BLOOM would need the mean folded into the writers first, as SliceGPT does) and
Gemma-3's norms after o_proj / down_proj scale the rotated stream per channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from methods.arch import ModelSpec, get_module, sublayer_of
from methods.base import Calib, ConfigError, LinearStats, Method, register
from methods.gptq import GPTQ, GPTQConfig
from methods.layers import (
    FakeQuantLinear,
    config_for,
    iter_block_linears,
    replace_linear,
    round_and_wrap,
)
from methods.primitives import mse_clip_ratio, weight_granularity
from methods.rotation import Rotation, hadamard_factors, make_rotation
from methods.smoothing import scale_linear_columns
from methods.transformed import TransformedLinear, with_input_rotation

log = logging.getLogger(__name__)

ResidualRotation = Literal["hadamard", "orthogonal"]
WeightSolver = Literal["gptq", "rtn"]


@dataclass(frozen=True)
class QuaRotConfig(GPTQConfig):
    """GPTQConfig's solver settings apply when weight_solver=gptq."""

    group_size: int | None = None         # the paper: per output channel
    act_mode: str = "dynamic_token"       # per-token activations (the paper's)
    rotation: ResidualRotation = "hadamard"
    online_down: bool = True              # online Hadamard on down_proj's input
    online_heads: bool = False            # online Hadamard on o_proj's input
    weight_solver: WeightSolver = "gptq"
    rtn_mse_clip: bool = True             # RTN: per-channel range by round-trip MSE
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_mode != "dynamic_token":
            raise ConfigError(f"quarot act_mode={self.act_mode!r}: activations are quantized "
                              "per token after the rotation; use act_mode=dynamic_token")
        if self.rotation not in ("hadamard", "orthogonal"):
            raise ConfigError(f"quarot rotation={self.rotation!r}; use hadamard (randomized "
                              "Hadamard, the paper) or orthogonal (random orthogonal)")
        if self.weight_solver not in ("gptq", "rtn"):
            raise ConfigError(f"quarot weight_solver={self.weight_solver!r}; use gptq or rtn")


def family_reason(spec: ModelSpec) -> str | None:
    """Why the residual rotation is not exact for spec's family, or None."""
    kind = spec.table.norm_kind
    if kind == "layernorm":
        return (f"quarot needs RMSNorm: {spec.table.family}'s LayerNorm subtracts the mean, "
                "which a rotation of the residual stream does not preserve (the mean would "
                "have to be folded into the stream's writers first, not implemented)")
    if kind != "rmsnorm":
        return (f"quarot needs plain RMSNorm before every linear group: {spec.table.family} "
                f"has {kind} norms, including ones after o_proj / down_proj that scale the "
                "rotated stream per channel")
    return None


def rotation_sizes(spec: ModelSpec, c: QuaRotConfig) -> dict[str, int]:
    """{what: order} of every rotation QuaRot builds for spec."""
    sizes = {"residual": spec.hidden_size}
    for name in spec.table.residual_writers:
        sub = sublayer_of(spec.table.group_of(name).role)
        if (sub == "mlp" and c.online_down) or (sub == "attn" and c.online_heads):
            sizes[name] = spec.in_features[name]
    return sizes


# ---------------------------------------------------------------- the rewrite (exact)

@torch.no_grad()
def untie_lm_head(model: nn.Module, spec: ModelSpec) -> bool:
    """Give lm_head its own weight when it shares the embedding's; True if it did."""
    head, embed = get_module(model, spec.table.lm_head), get_module(model, spec.table.embed)
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
        getattr(model.config, "get_text_config", lambda: model.config)().tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_rmsnorms(model: nn.Module, spec: ModelSpec) -> None:
    """Each RMSNorm scale into the columns of the linears it feeds; the norm's w <- 1."""
    pairs: list[tuple[nn.Module, list[nn.Module]]] = []
    for block in spec.blocks(model):
        for g in spec.table.groups:
            if g.feeder_kind == "norm":
                pairs.append((block.get_submodule(g.feeder),
                              [block.get_submodule(n) for n in g.linears]))
    pairs.append((get_module(model, spec.table.final_norm),
                  [get_module(model, spec.table.lm_head)]))
    for norm, linears in pairs:
        w = norm.weight.detach().float()
        for lin in linears:
            scale_linear_columns(lin, w)
        norm.weight.data = torch.ones_like(norm.weight)


@torch.no_grad()
def rotate_residual(model: nn.Module, spec: ModelSpec, R: Rotation) -> None:
    """h -> R h through embedding, readers (W R^T) and writers (R W, R b)."""
    embed = get_module(model, spec.table.embed)
    embed.weight.data = R.apply(embed.weight.data)
    readers = [get_module(model, spec.table.lm_head)]
    writers = []
    for block in spec.blocks(model):
        readers += [block.get_submodule(n) for g in spec.table.groups if g.feeder_kind == "norm"
                    for n in g.linears]
        writers += [block.get_submodule(n) for n in spec.table.residual_writers]
    for lin in readers:
        lin.weight.data = R.apply(lin.weight.data)
    for lin in writers:
        lin.weight.data = R.apply(lin.weight.data.T).T.contiguous()
        if lin.bias is not None:
            lin.bias.data = R.apply(lin.bias.data)


@torch.no_grad()
def rotate_model(model: nn.Module, spec: ModelSpec, c: QuaRotConfig) -> dict[str, Any]:
    """Steps 1-3 in place (function-preserving in exact arithmetic); what was done."""
    reason = family_reason(spec)
    if reason:
        raise ValueError(reason)
    untied = untie_lm_head(model, spec)
    fold_rmsnorms(model, spec)
    sizes = rotation_sizes(spec, c)
    kind = c.rotation
    rotate_residual(model, spec, make_rotation(kind, sizes.pop("residual"), c.seed))
    for j, (rel, n) in enumerate(sizes.items(), start=1):
        R = make_rotation("hadamard", n, c.seed + j)      # online: always a Hadamard
        for block in spec.blocks(model):
            replace_linear(block, rel, with_input_rotation(block.get_submodule(rel), R))
    return {"rotation": kind, "hidden_size": spec.hidden_size, "untied_lm_head": untied,
            "online": sorted(sizes)}


# ---------------------------------------------------------------- weights

class _RotatedGPTQ(GPTQ):
    """GPTQ's block walk; an online-rotated linear is solved on its rotated Hessian."""

    def quantize_linear(self, linear: nn.Linear, H: Tensor, n: int, stats: LinearStats,
                        cfg: GPTQConfig | None = None, name: str = ""
                        ) -> tuple[FakeQuantLinear, dict[str, Any]]:
        if not isinstance(linear, TransformedLinear):
            return super().quantize_linear(linear, H, n, stats, cfg, name)
        new, info = super().quantize_linear(linear, linear.r_in.conjugate(H), n, stats, cfg,
                                            name)
        return TransformedLinear(new, r_in=linear.r_in), info


def quantize_rtn(model: nn.Module, spec: ModelSpec, c: QuaRotConfig) -> None:
    for _, _, full, lin in list(iter_block_linears(model, spec)):
        if (cfg := config_for(c, full)) is None:
            continue
        ratio: float | Tensor = 1.0
        if c.rtn_mse_clip and cfg.quantizes_weights:
            ratio = mse_clip_ratio(lin.weight.data, cfg.w_bits, cfg.symmetric,
                                   weight_granularity(cfg.group_size), cfg.group_size)
        r_in = lin.r_in if isinstance(lin, TransformedLinear) else None
        new = round_and_wrap(lin, cfg, clip_ratio=ratio)
        replace_linear(model, full, new if r_in is None else TransformedLinear(new, r_in=r_in))


@register(QuaRotConfig)
class QuaRot(Method[QuaRotConfig]):
    name = "quarot"
    supported_bits = frozenset({(4, 8), (4, 4), (8, 8), (4, 16), (3, 16), (8, 16)})
    cacheable = False              # embeddings, norms and lm_head change too
    rewrites_model = True          # the residual stream is rotated

    @property
    def needs_calibration(self) -> bool:
        return self.config.weight_solver == "gptq" and self.config.quantizes_weights

    def check(self, spec: ModelSpec) -> str | None:
        reason = super().check(spec) or family_reason(spec)
        if reason:
            return reason
        for what, n in rotation_sizes(spec, self.config).items():
            if what != "residual" or self.config.rotation == "hadamard":
                try:
                    hadamard_factors(n)
                except ValueError as e:
                    return f"quarot: {what} ({n}): {e}"
        return None

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        c = self.config
        self.artifacts["quarot"] = rotate_model(model, spec, c)
        if not c.quantizes_weights or c.weight_solver == "rtn":
            quantize_rtn(model, spec, c)
            return model
        if not calib:
            raise ValueError("quarot with weight_solver=gptq needs calibration data "
                             "(set calib=..., or method.weight_solver=rtn)")
        solver = _RotatedGPTQ(c)
        solver.quantize(model, spec, calib)
        self.artifacts.update(solver.artifacts)
        return model
