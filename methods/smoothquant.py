"""SmoothQuant (Xiao et al., 2023, arXiv 2211.10438): migrate activation outliers into weights.

Per linear group reading X [tokens, K] (q/k/v; gate/up; optionally o and down):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (Sec. 4, Eq. 4)

max|W_j| over the columns j of all the group's linears. X / s is folded into the
producing norm (and, with fold_linear_feeders, into v_proj / up_proj for o / down), the
columns of W by s (methods/smoothing.py), so the smoothed model computes the same function.
Weights: round-to-nearest, per output channel (W8A8; the paper quantizes weights per
tensor, per channel is finer) or per group (W4A8). Activations: static per-tensor from the
smoothed calibration range (the paper's O3 setting) or dynamic per-token (O1). The smoothed range needs no second calibration
pass: max|X_j / s_j| = max|X_j| / s_j exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from methods.arch import LinearGroup, ModelSpec
from methods.base import Calib, ConfigError, LinearStats, Method, QuantConfig, register
from methods.blockwise import (
    BlockInputs,
    collect_block_stats,
    estimated_input_ranges,
    stats_table,
    walk_blocks,
)
from methods.layers import config_for, replace_linear, round_and_wrap
from methods.smoothing import (
    S_MIN,
    fold_group_scale,
    fold_reason,
    group_weight_channel_max,
    needs_kv_sharing,
    share_across_kv_repeat,
)


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    alpha: float = 0.5                  # migration strength; 0.5 in the paper for OPT/LLaMA
    fold_linear_feeders: bool = False   # also smooth o (into v_proj) and down (into up_proj)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1] (0.5 is the paper's "
                              "default; larger moves more of the range into the weights)")


def smoothquant_scale(x_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); both [K]."""
    x = x_max.float().clamp_min(S_MIN)
    w = w_max.float().clamp_min(S_MIN)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(S_MIN)


def group_input_max(stats: dict[str, LinearStats], group: LinearGroup) -> Tensor:
    """Per-channel max|X_j| [K] of the input the group's linears share."""
    return torch.stack([stats[n].channel_max for n in group.linears]).amax(dim=0)


def scale_summary(s: Tensor | None) -> dict[str, float | None]:
    if s is None:
        return {"s_min": None, "s_max": None, "s_mean": None}
    return {"s_min": float(s.min()), "s_max": float(s.max()), "s_mean": float(s.mean())}


@register(SmoothQuantConfig)
class SmoothQuant(Method[SmoothQuantConfig]):
    name = "smoothquant"
    supported_bits = frozenset({(8, 8), (4, 8)})

    @property
    def needs_calibration(self) -> bool:
        return True

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        if not calib:
            raise ValueError("smoothquant needs calibration data (set calib=...)")
        cfg = self.config
        prefix = spec.table.blocks
        rows: list[dict[str, Any]] = []
        all_stats: dict[str, LinearStats] = {}

        def on_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            stats = collect_block_stats(block, inputs, spec.table.linear_names())
            all_stats.update({f"{prefix}.{i}.{n}": st for n, st in stats.items()})
            # every fold first: o / down fold into v_proj / up_proj, which must still be
            # full precision when their rows are rescaled
            plans = [self._smooth(block, g, stats, spec) for g in spec.table.groups]
            static = cfg.quantizes_activations and cfg.act_mode == "static_tensor"
            ranges = estimated_input_ranges(block, inputs, spec.table.linear_names(),
                                            cfg) if static else {}
            for group, (v, v_after, s, reason) in zip(spec.table.groups, plans, strict=True):
                v_static = ranges.get(group.linears[0], v_after)
                rows.extend(self._quantize_group(i, block, group, v, v_static, s, reason,
                                                 spec))

        walk_blocks(model, spec, calib, on_block, desc="smoothquant blocks")
        self.artifacts["smoothquant"] = {"alpha": cfg.alpha, "rows": rows}
        self.artifacts["activation_stats"] = stats_table(all_stats)
        return model

    def _smooth(self, block: nn.Module, group: LinearGroup, stats: dict[str, LinearStats],
                spec: ModelSpec) -> tuple[float, float, Tensor | None, str | None]:
        """Fold s into the group if possible: (v, range after smoothing, s, why not)."""
        cfg = self.config
        x_max = group_input_max(stats, group)
        v = float(x_max.max())
        reason = fold_reason(group, spec, cfg.fold_linear_feeders)
        if reason:
            return v, v, None, reason
        w_max = group_weight_channel_max(block, group)
        if needs_kv_sharing(block, group):
            x_max = share_across_kv_repeat(x_max, spec)
            w_max = share_across_kv_repeat(w_max, spec)
        s = smoothquant_scale(x_max, w_max, cfg.alpha)
        result = fold_group_scale(block, group, s, spec, cfg.fold_linear_feeders)
        if not result:
            return v, v, None, result.reason
        return v, float((x_max / s).max()), s, None

    def _quantize_group(self, i: int, block: nn.Module, group: LinearGroup, v: float,
                        v_after: float, s: Tensor | None, reason: str | None, spec: ModelSpec
                        ) -> list[dict[str, Any]]:
        cfg = self.config
        out = []
        for name in group.linears:
            full = f"{spec.table.blocks}.{i}.{name}"
            lin_cfg = config_for(cfg, full)
            if lin_cfg is not None:
                lin = block.get_submodule(name)
                replace_linear(block, name, round_and_wrap(lin, lin_cfg, act_range=v_after))
            out.append({"block": i, "linear": full, "role": group.role, "v": v,
                        "v_after": v_after, "smoothed": s is not None, "reason": reason,
                        "kept_fp": lin_cfg is None, **scale_summary(s)})
        return out
