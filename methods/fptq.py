"""FPTQ: fine-grained post-training quantization (Li et al., 2023, arXiv 2308.15987).

W4A8: group-wise int4 weights, int8 activations with the activation strategy chosen per
linear group from its calibration range v = max|X| (Sec. 3.2, the layer-wise policy):

    v <= v0          static per-tensor int8 (cheapest: one calibrated scale)
    v0 < v <= v1     logarithmic activation equalization (LAE, Sec. 3.3)
                         s_j = max|X_j| / log2(2 + max|X_j|)
                     X / s folded into the producing op, W columns * s, then static
                     per-tensor int8 with the scale of the equalized range max_j(max|X_j| / s_j)
    v > v1           dynamic per-token int8 (outliers too large to equalize)

The paper sets v0 = 15, v1 = 150 (method=fptq_paper). ptqbench ships v0 = 0: every group
up to v1 is equalized before its static scale (LAE folds into the producer, so it costs
nothing at runtime), because the plain static bucket is where the paper's policy loses
accuracy on SmolLM2-135M and Gemma-3-270M (reports/fptq). Linears reading one input
(q/k/v; gate/up) share one decision. A middle-bucket group whose s cannot be folded (no producer in the family
table, or fold_linear_feeders=false for o/down) falls back to dynamic per-token and the
report says why: an unfolded s would cost a per-channel multiply at runtime.

Weights: RTN on the (equalized) W by default, or GPTQ (methods.gptq.GPTQSolver) after
LAE, solved group by group inside a block so that later groups see the quantized earlier
ones (true-sequential). KV-cache quantization is the shared setting of every method
(QuantConfig.kv_bits / kv_granularity, methods/kvcache.py); records made before it moved
there carry kv_cache_bits / kv_mode (per_head_static = kv_granularity per_head).

Ablations: middle=smoothquant (SmoothQuant's s with sq_alpha instead of LAE in the middle
bucket), policy=all_static / all_dynamic (one strategy everywhere, no equalization).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from methods.arch import LinearGroup, ModelSpec
from methods.base import Calib, ConfigError, LinearStats, Method, QuantConfig, register
from methods.blockwise import (
    BlockInputs,
    collect_block_stats,
    estimated_input_ranges,
    input_hooks,
    walk_blocks,
)
from methods.figures import save_figure
from methods.gptq import GPTQSolver, GPTQSolverConfig
from methods.layers import config_for, replace_linear, round_and_wrap
from methods.smoothing import (
    S_MIN,
    fold_group_scale,
    fold_reason,
    group_weight_channel_max,
    needs_kv_sharing,
    share_across_kv_repeat,
)
from methods.smoothquant import group_input_max, scale_summary, smoothquant_scale

log = logging.getLogger(__name__)

Bucket = Literal["static", "lae", "dynamic"]
WEIGHT_METHODS = ("rtn", "gptq")
MIDDLES = ("lae", "smoothquant")
POLICIES = ("layerwise", "all_static", "all_dynamic")


LEGACY_GPTQ_KEYS = {"gptq_damp": "damp", "gptq_block_size": "block_size",
                    "gptq_act_order": "act_order", "gptq_static_groups": "static_groups"}


@dataclass(frozen=True)
class FPTQConfig(QuantConfig):
    w_bits: int = 4
    a_bits: int = 8
    group_size: int | None = 128
    v0: float = 0.0                     # static / LAE threshold on v = max|X| (paper: 15)
    v1: float = 150.0                   # middle / dynamic threshold
    weight_method: str = "rtn"          # rtn | gptq (GPTQ runs after LAE)
    middle: str = "lae"                 # lae | smoothquant (ablation)
    sq_alpha: float = 0.5               # SmoothQuant migration strength when middle=smoothquant
    policy: str = "layerwise"           # layerwise | all_static | all_dynamic (ablations)
    fold_linear_feeders: bool = True    # equalize o (into v_proj) and down (into up_proj)
    gptq: GPTQSolverConfig = field(default_factory=GPTQSolverConfig)   # weight_method=gptq

    @classmethod
    def upgrade_settings(cls, node: dict[str, Any]) -> dict[str, Any]:
        """Records before the nested `gptq` node spelled its fields gptq_damp, ... flat."""
        flat = {k: v for k, v in node.items() if k in LEGACY_GPTQ_KEYS}
        if not flat:
            return node
        nested = {**(node.get("gptq") or {}),
                  **{LEGACY_GPTQ_KEYS[k]: v for k, v in flat.items()}}
        return {**{k: v for k, v in node.items() if k not in flat},
                "gptq": asdict(GPTQSolverConfig(**nested))}   # what those runs used

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.gptq, Mapping):      # a config node: method.gptq.damp=...
            try:
                object.__setattr__(self, "gptq", GPTQSolverConfig(**self.gptq))
            except TypeError as e:
                raise ConfigError(f"method.gptq: {e}; its settings: "
                                  f"{[f.name for f in fields(GPTQSolverConfig)]}") from None
        if self.weight_method == "gptq":
            self.gptq.check_groups(self.group_size)
        if not (self.v0 >= 0 and self.v1 > 0 and self.v0 < self.v1):
            raise ConfigError(f"FPTQ thresholds need 0 <= v0 < v1, got v0={self.v0}, "
                              f"v1={self.v1} (the paper uses v0=15, v1=150; v0=0 "
                              "equalizes every group below v1)")
        for field_name, value, allowed in (("weight_method", self.weight_method, WEIGHT_METHODS),
                                           ("middle", self.middle, MIDDLES),
                                           ("policy", self.policy, POLICIES)):
            if value not in allowed:
                raise ConfigError(f"{field_name}={value!r}; use one of {allowed}")
        if not 0.0 <= float(self.sq_alpha) <= 1.0:
            raise ConfigError(f"sq_alpha={self.sq_alpha} must be in [0, 1]")


# ------------------------------------------------------------------ pure policy functions

def assign_bucket(v: float, v0: float, v1: float) -> Bucket:
    if v <= v0:
        return "static"
    if v <= v1:
        return "lae"
    return "dynamic"


def lae_scale(x_max: Tensor) -> Tensor:
    """s_j = max|X_j| / log2(2 + max|X_j|) [K]; X_j / s_j then spans log2(2 + max|X_j|)."""
    x = x_max.float().clamp_min(S_MIN)
    return (x / torch.log2(2.0 + x)).clamp_min(S_MIN)


@dataclass
class GroupDecision:
    """What FPTQ does to one linear group of one block."""
    block: int
    group: LinearGroup
    v: float
    bucket: Bucket
    act_mode: str                       # static_tensor | dynamic_token
    strategy: str                       # static | lae+static | smoothquant+static | dynamic
    act_range: float | None = None      # max|X| after equalization (static modes)
    s: Tensor | None = None
    fallback: str | None = None
    v_max_after: float | None = None    # max|X| after equalization when act_range != minmax

    def rows(self, prefix: str, keeps) -> list[dict[str, Any]]:
        out = []
        for name in self.group.linears:
            full = f"{prefix}.{self.block}.{name}"
            kept = keeps(full)
            out.append({"block": self.block, "linear": full, "role": self.group.role,
                        "v": self.v, "bucket": self.bucket,
                        "strategy": "fp (keep_fp)" if kept else self.strategy,
                        "fallback_reason": self.fallback, "range_after": self.act_range,
                        **({} if self.v_max_after is None else
                           {"max_after": self.v_max_after}),
                        **scale_summary(self.s)})
        return out


def policy_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_role: dict[str, dict[str, int]] = {}
    for r in rows:
        by_role.setdefault(r["role"], Counter())[r["bucket"]] += 1
    return {"bucket": dict(Counter(r["bucket"] for r in rows)),
            "strategy": dict(Counter(r["strategy"] for r in rows)),
            "by_role": {k: dict(v) for k, v in by_role.items()},
            "fallbacks": sum(r["fallback_reason"] is not None for r in rows)}


# Okabe-Ito: distinguishable under the common colour-vision deficiencies.
STRATEGY_COLOURS = {"static": "#0072B2", "lae+static": "#009E73",
                    "smoothquant+static": "#CC79A7", "dynamic": "#D55E00",
                    "fp (keep_fp)": "#999999"}
ROLE_MARKERS = ("o", "s", "^", "D", "v", "P")


def policy_figure(rows: Sequence[dict[str, Any]], thresholds: Mapping[str, float],
                  title: str = "FPTQ layer-wise activation policy"):
    """The one FPTQ policy plot: activation range v per block (log y), points coloured by
    the strategy the data names (STRATEGY_COLOURS) and shaped by role, the thresholds
    (v0 dashed, v1 dotted) as lines. Returns the matplotlib Figure; the caller saves it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(dict.fromkeys(r["role"] for r in rows))
    offsets = {role: (k - (len(roles) - 1) / 2) * 0.15 for k, role in enumerate(roles)}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    seen = set()
    for r in rows:
        role, strat = r["role"], r["strategy"]
        key = (role, strat)
        ax.scatter(r["block"] + offsets[role], max(r["v"], 1e-3),
                   c=STRATEGY_COLOURS.get(strat, "#000000"),
                   marker=ROLE_MARKERS[roles.index(role) % len(ROLE_MARKERS)],
                   s=28, edgecolors="black", linewidths=0.3,
                   label=f"{role}: {strat}" if key not in seen else None)
        seen.add(key)
    for name, style in (("v0", "--"), ("v1", ":")):
        if name in thresholds:
            ax.axhline(thresholds[name], color="black", linestyle=style, linewidth=1,
                       label=f"{name} = {thresholds[name]:g}")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("activation range v = max|X| (log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_policy(rows: list[dict[str, Any]], path: str | Path, v0: float, v1: float,
                title: str = "FPTQ layer-wise activation policy") -> Path:
    """policy_figure written to `path` atomically (tmp file + rename)."""
    return save_figure(policy_figure(rows, {"v0": v0, "v1": v1}, title), Path(path))


# ------------------------------------------------------------------ the method

@register(FPTQConfig)
class FPTQ(Method[FPTQConfig]):
    name = "fptq"
    supported_bits = frozenset({(4, 8)})

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, spec: ModelSpec) -> str | None:
        reason = super().check(spec)
        if reason:
            return reason
        return None

    # -------------------------------------------------------------- per-group decision

    def decide(self, i: int, block: nn.Module, group: LinearGroup,
               stats: dict[str, LinearStats], spec: ModelSpec) -> GroupDecision:
        """Bucket from v, then fold s for the middle bucket (or fall back); mutates block."""
        cfg = self.config
        x_max = group_input_max(stats, group)
        v = float(x_max.max())
        bucket = assign_bucket(v, cfg.v0, cfg.v1)
        if cfg.policy == "all_static" or (cfg.policy == "layerwise" and bucket == "static"):
            return GroupDecision(i, group, v, bucket, "static_tensor", "static", act_range=v)
        if cfg.policy == "all_dynamic" or bucket == "dynamic":
            return GroupDecision(i, group, v, bucket, "dynamic_token", "dynamic")
        reason = fold_reason(group, spec, cfg.fold_linear_feeders)
        if reason:
            return GroupDecision(i, group, v, bucket, "dynamic_token", "dynamic",
                                 fallback=f"no fold possible, per-token dynamic: {reason}")
        shared = needs_kv_sharing(block, group)
        if shared:
            x_max = share_across_kv_repeat(x_max, spec)
        if cfg.middle == "lae":
            s, strategy = lae_scale(x_max), "lae+static"
        else:
            w_max = group_weight_channel_max(block, group)
            if shared:
                w_max = share_across_kv_repeat(w_max, spec)
            s, strategy = smoothquant_scale(x_max, w_max, cfg.sq_alpha), "smoothquant+static"
        result = fold_group_scale(block, group, s, spec, cfg.fold_linear_feeders)
        if not result:
            return GroupDecision(i, group, v, bucket, "dynamic_token", "dynamic",
                                 fallback=f"no fold possible, per-token dynamic: {result.reason}")
        return GroupDecision(i, group, v, bucket, "static_tensor", strategy,
                             act_range=float((x_max / s).max()), s=s)

    def _estimate_static_ranges(self, block: nn.Module, inputs: BlockInputs,
                                decisions: list[GroupDecision]) -> None:
        """act_range != minmax: each static group's range from its (equalized) input as the
        folded block computes it; the max-based range stays in `v_max_after`."""
        static = [d for d in decisions if d.act_mode == "static_tensor"]
        names = [d.group.linears[0] for d in static]
        ranges = estimated_input_ranges(block, inputs, names, self.config) if names else {}
        for d, name in zip(static, names, strict=True):
            if name in ranges:
                d.v_max_after, d.act_range = d.act_range, ranges[name]

    # -------------------------------------------------------------- weights

    def _linear_configs(self, d: GroupDecision, prefix: str) -> dict[str, FPTQConfig]:
        """The group's quantized linears with their own configs (keep_fp / keep_w8)."""
        return {n: c for n in d.group.linears
                if (c := config_for(self.config, f"{prefix}.{d.block}.{n}")) is not None}

    def _quantize_rtn(self, block: nn.Module, d: GroupDecision, prefix: str) -> None:
        for name, cfg in self._linear_configs(d, prefix).items():
            replace_linear(block, name, round_and_wrap(
                block.get_submodule(name), cfg, act_mode=d.act_mode, act_range=d.act_range))

    def _quantize_gptq(self, block: nn.Module, d: GroupDecision, inputs: BlockInputs,
                       prefix: str) -> None:
        """Hessians from the (equalized) inputs of this group with earlier groups of the
        block already quantized; solve; free."""
        cfgs = self._linear_configs(d, prefix)
        if not cfgs:
            return
        solvers = {n: GPTQSolver(block.get_submodule(n).weight.data) for n in cfgs}
        with input_hooks({n: block.get_submodule(n) for n in cfgs},
                         lambda n, x: solvers[n].add_batch(x)):
            for x, kw in inputs.samples():
                block(x, **kw)
        for n, cfg in cfgs.items():
            solved = solvers[n].solve(
                bits=cfg.w_bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                grid=cfg.w_grid, **cfg.gptq.solve_kwargs())[:2]
            solvers[n].free()
            replace_linear(block, n, round_and_wrap(block.get_submodule(n), cfg, solved=solved,
                                                    act_mode=d.act_mode, act_range=d.act_range))

    # -------------------------------------------------------------- driver

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        if not calib:
            raise ValueError("fptq needs calibration data (set calib=...)")
        cfg = self.config
        prefix = spec.table.blocks
        rows: list[dict[str, Any]] = []

        def on_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            stats = collect_block_stats(block, inputs, spec.table.linear_names())
            decisions = [self.decide(i, block, g, stats, spec) for g in spec.table.groups]
            self._estimate_static_ranges(block, inputs, decisions)
            for d in decisions:
                if cfg.weight_method == "gptq":
                    self._quantize_gptq(block, d, inputs, prefix)
                else:
                    self._quantize_rtn(block, d, prefix)
                rows.extend(d.rows(prefix, cfg.keeps))

        walk_blocks(model, spec, calib, on_block, desc="fptq blocks")
        counts = policy_counts(rows)
        log.info("fptq policy (v0=%g, v1=%g, %s): %s", cfg.v0, cfg.v1, cfg.policy, counts)
        self.artifacts["fptq_policy"] = {
            "v0": cfg.v0, "v1": cfg.v1, "policy": cfg.policy, "middle": cfg.middle,
            "weight_method": cfg.weight_method, "counts": counts, "rows": rows,
        }
        return model

    def write_artifacts(self, run_dir: str | Path) -> dict[str, str]:
        """Plots the policy report into run_dir; returns {artifact name: path}."""
        policy = self.artifacts.get("fptq_policy")
        if not policy:
            return {}
        path = plot_policy(policy["rows"], Path(run_dir) / "fptq_policy.png",
                           policy["v0"], policy["v1"])
        return {"fptq_policy_plot": str(path)}

