"""RTN: round-to-nearest weights at w_bits (per channel or per group), activations at
a_bits, static per-tensor (scale from calibration max|X|) or dynamic per-token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.arch import ModelSpec
from methods.base import Calib, LinearStats, Method, QuantConfig, register
from methods.blockwise import collect_block_stats, for_each_block, stats_table, walk_blocks
from methods.layers import config_for, replace_linear, round_and_wrap


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """The shared settings alone: w_bits / group_size / symmetric / w_grid for the weights,
    a_bits / act_mode / act_range for the activations."""


@register(RTNConfig)
class RTN(Method[RTNConfig]):
    name = "rtn"

    @property
    def needs_calibration(self) -> bool:
        c = self.config
        return c.quantizes_activations and c.act_mode == "static_tensor"

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        if not self.needs_calibration:
            def round_block(i: int, block: nn.Module) -> None:
                for rel in spec.table.linear_names():
                    cfg = config_for(self.config, f"{spec.table.blocks}.{i}.{rel}")
                    if cfg is not None:
                        replace_linear(block, rel, round_and_wrap(block.get_submodule(rel), cfg))

            for_each_block(model, spec, round_block, desc="rtn blocks")
            return model
        if not calib:
            raise ValueError("rtn with static activation scales needs calibration data")
        all_stats: dict[str, LinearStats] = {}
        prefix = spec.table.blocks

        def on_block(i: int, block: nn.Module, inputs) -> None:
            stats = collect_block_stats(block, inputs, spec.table.linear_names(),
                                        estimator=self.config.range_estimator)
            for rel, st in stats.items():
                full = f"{prefix}.{i}.{rel}"
                all_stats[full] = st
                if (cfg := config_for(self.config, full)) is not None:
                    lin = block.get_submodule(rel)
                    replace_linear(block, rel, round_and_wrap(lin, cfg, act_range=st.static_range))

        walk_blocks(model, spec, calib, on_block, desc="rtn blocks")
        self.artifacts["activation_stats"] = stats_table(all_stats)
        return model
