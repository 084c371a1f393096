"""RTN: round-to-nearest weights at w_bits (per channel or per group), activations at
a_bits, static per-tensor (scale from calibration max|X|) or dynamic per-token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.arch import ModelSpec
from methods.base import Calib, LinearStats, Method, QuantConfig, register
from methods.blockwise import collect_block_stats, stats_table, walk_blocks
from methods.layers import FakeQuantLinear, config_for, iter_block_linears, replace_linear
from methods.primitives import compute_qparams, dequantize, quantize, weight_granularity


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    pass


def quantize_linear_rtn(linear: nn.Linear, cfg: QuantConfig, stats: LinearStats | None,
                        clip_ratio: float = 1.0) -> FakeQuantLinear:
    """Round W to the grid and wrap it with the input quantizer cfg asks for."""
    qp = None
    if cfg.quantizes_weights:
        gran = weight_granularity(cfg.group_size)
        W = linear.weight.data
        qp = compute_qparams(W, cfg.w_bits, cfg.symmetric, gran, cfg.group_size, clip_ratio)
        linear.weight.data = dequantize(quantize(W, qp, gran, cfg.group_size), qp, gran,
                                        cfg.group_size, W.dtype)
    act_scale = None
    if cfg.quantizes_activations and cfg.act_mode == "static_tensor":
        if stats is None:
            raise ValueError("static activation scales need calibration statistics")
        act_scale = FakeQuantLinear.static_scale_from_max(stats.tensor_max, cfg.a_bits)
    return FakeQuantLinear(linear, w_bits=cfg.w_bits, group_size=cfg.group_size, w_qparams=qp,
                           a_bits=cfg.a_bits, act_mode=cfg.act_mode, act_scale=act_scale)


@register(RTNConfig)
class RTN(Method[RTNConfig]):
    name = "rtn"

    @property
    def needs_calibration(self) -> bool:
        c = self.config
        return c.quantizes_activations and c.act_mode == "static_tensor"

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        if not self.needs_calibration:
            for _, _, full, lin in iter_block_linears(model, spec):
                if (cfg := config_for(self.config, full)) is not None:
                    replace_linear(model, full, quantize_linear_rtn(lin, cfg, None))
            return model
        if not calib:
            raise ValueError("rtn with static activation scales needs calibration data")
        all_stats: dict[str, LinearStats] = {}
        prefix = spec.table.blocks

        def on_block(i: int, block: nn.Module, inputs) -> None:
            stats = collect_block_stats(block, inputs, spec.table.linear_names())
            for rel, st in stats.items():
                full = f"{prefix}.{i}.{rel}"
                all_stats[full] = st
                if (cfg := config_for(self.config, full)) is not None:
                    lin = block.get_submodule(rel)
                    replace_linear(block, rel, quantize_linear_rtn(lin, cfg, st))

        walk_blocks(model, spec, calib, on_block, desc="rtn blocks")
        self.artifacts["activation_stats"] = stats_table(all_stats)
        return model
