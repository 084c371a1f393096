"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration"; reference: mit-han-lab/llm-awq awq/quantize/auto_scale.py, auto_clip.py).

Per block, for each LinearGroup (linears sharing one input X [tokens, K]) in table order:
  1. scale search: s = mean_t|X|^r (optionally duo: / mean|W_norm|^(1-r)), normalised by
     sqrt(max s * min s), for r on a grid of n_grid values in [0, 1) (ratio_grid=half_open, llm-awq)
     or [0, 1] (closed, llm-compressor); the loss is the MSE of
     the inspected module's output (the group's common parent, e.g. self_attn / mlp, or the
     single linear for o / down) with every linear of the group at Q(W diag(s)) diag(s)^-1
     against the full-precision output. The best s is folded into the feeder (norm weight,
     or the rows of the feeding linear for v->o and up->down) and W <- W diag(s): the
     full-precision function is unchanged.
  2. clipping search: per output channel and group, max|W| shrunk by (1 - i/n_grid) for
     i < max_shrink * n_grid, by the MSE of the group-wise partial products on a token
     subsample (q/k skipped, as the reference does).
  3. round-to-nearest at w_bits (group-wise, asymmetric by default) and the activation
     quantizer a_bits asks for (static scales from the scaled inputs' max |X|).

Block i is calibrated on the outputs of the already-quantized block i-1 (shared engine,
`inputs_from=quantized`, the default: error-aware like GPTQ), or, with `inputs_from=fp`, on
full-precision outputs as llm-awq and llm-compressor do (the next block's inputs are computed
after the function-preserving scaling, before clipping and rounding).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from methods.arch import LinearGroup, ModelSpec
from methods.base import Calib, ConfigError, LinearStats, Method, QuantConfig, register
from methods.blockwise import (
    BlockInputs,
    add_to_hessian,
    collect_block_stats,
    stats_table,
    to_device,
    walk_blocks,
)
from methods.layers import config_for, replace_linear, round_and_wrap
from methods.primitives import fake_quantize_weight
from methods.smoothing import (
    fold_into_linear_rows,
    fold_into_norm,
    kv_rows_from_o_channels,
    needs_kv_sharing,
    scale_linear_columns,
    share_across_kv_repeat,
)

log = logging.getLogger(__name__)

# Relative margin of the Gram-matrix shortlist (AWQ._gram_shortlist): fp32 rounding in the
# Gram loss and in the forward loss is ~1e-5 of the loss; candidates this close to the
# smallest Gram loss are scored by the forward loss, which decides as the full search does.
GRAM_RTOL = 1e-3


@dataclass(frozen=True)
class AWQConfig(QuantConfig):
    group_size: int | None = 128
    symmetric: bool = False                    # paper: zero point (asymmetric) INT4 g128
    n_grid: int = 20                           # number of scale exponents r searched
    ratio_grid: str = "half_open"              # r = i/n_grid, i < n (llm-awq); closed: i/(n-1)
    duo_scaling: bool = False                  # llm-awq: activations only; AutoAWQ: duo
    fold_linear: bool = True                   # v->o and up->down scales (llm-awq)
    gqa_shared_scale: bool = False             # v->o under GQA with s shared across repeats
    clip: bool = True
    clip_max_shrink: float = 0.5
    clip_n_grid: int = 20
    clip_n_tokens: int = 512                   # token subsample for the clip search
    clip_skip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    offload_inputs: bool = False     # keep block inputs on CPU between blocks (large models)
    inputs_from: str = "quantized"   # next block's calibration inputs: quantized | fp (llm-awq)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "clip_skip", tuple(self.clip_skip or ()))
        if self.n_grid < 2:
            raise ConfigError(f"awq n_grid={self.n_grid} must be >= 2 (paper: 20)")
        if self.clip_n_grid < 2:
            raise ConfigError(f"awq clip_n_grid={self.clip_n_grid} must be >= 2 (paper: 20)")
        if not 0 <= self.clip_max_shrink < 1:
            raise ConfigError(f"awq clip_max_shrink={self.clip_max_shrink} must be in [0, 1)")
        if self.clip_n_tokens < 1:
            raise ConfigError("awq clip_n_tokens must be >= 1")
        if self.inputs_from not in ("quantized", "fp"):
            raise ConfigError(f"awq inputs_from={self.inputs_from!r}: use quantized or fp")
        if self.ratio_grid not in RATIO_GRIDS:
            raise ConfigError(f"awq ratio_grid={self.ratio_grid!r}: use one of {sorted(RATIO_GRIDS)}")

    def ratios(self) -> list[float]:
        """The exponents r of s = mean|X|^r tried by the scale search, in order."""
        return RATIO_GRIDS[self.ratio_grid](self.n_grid)


# half_open: llm-awq / AutoAWQ auto_scale (0, 0.05, ..., 0.95 for n = 20);
# closed: llm-compressor's AWQModifier (0, 1/19, ..., 1 for n = 20), which includes r = 1
RATIO_GRIDS = {
    "half_open": lambda n: [i / n for i in range(n)],
    "closed": lambda n: [i / (n - 1) for i in range(n)],
}


def inspect_path(group: LinearGroup) -> str:
    """The module whose output scores a group's scales: the linear itself when alone,
    else the linears' common parent ("" = the whole block)."""
    if len(group.linears) == 1:
        return group.linears[0]
    parents = {n.rpartition(".")[0] for n in group.linears}
    return parents.pop() if len(parents) == 1 else ""


@dataclass
class _GroupCapture:
    """One group's calibration view: X [tokens, K] per sample, the inspected module's
    call (kwargs without the hidden input) and its full-precision output."""
    X: list[Tensor]
    calls: list[tuple[bool, dict[str, Any]]]       # (hidden passed positionally, kwargs)
    Y: list[Tensor]


class _Capturer:
    def __init__(self, block: nn.Module, groups: list[LinearGroup], store: torch.device):
        self.store = store
        self.caps = {g.role: _GroupCapture([], [], []) for g in groups}
        self.handles = []
        for g in groups:
            cap = self.caps[g.role]
            first = block.get_submodule(g.linears[0])
            self.handles.append(first.register_forward_pre_hook(
                lambda m, a, cap=cap: cap.X.append(a[0].detach().to(self.store))))
            mod = block.get_submodule(inspect_path(g)) if inspect_path(g) else block
            self.handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, cap=cap: cap.calls.append(
                    (bool(a), {k: v for k, v in kw.items() if k != "hidden_states"})),
                with_kwargs=True))
            self.handles.append(mod.register_forward_hook(
                lambda m, a, out, cap=cap: cap.Y.append(_first(out).detach().to(self.store))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _call(mod: nn.Module, X: Tensor, call: tuple[bool, dict[str, Any]]) -> Tensor:
    positional, kw = call
    return _first(mod(X, **kw) if positional else mod(hidden_states=X, **kw))


@register(AWQConfig)
class AWQ(Method[AWQConfig]):
    name = "awq"
    supported_bits = frozenset({(4, 16), (3, 16), (4, 8)})

    @property
    def needs_calibration(self) -> bool:
        return True

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        if not calib:
            raise ValueError("awq needs calibration data (e.g. calib=pile-128x512, AWQ's default)")
        all_stats: dict[str, LinearStats] = {}
        scales: list[dict[str, Any]] = []
        prefix = spec.table.blocks
        n_blocks = len(spec.blocks(model))
        fp_inputs = self.config.inputs_from == "fp"

        def on_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            # each linear's own config (None: kept in full precision), by full name
            cfgs = {rel: config_for(self.config, f"{prefix}.{i}.{rel}")
                    for rel in spec.table.linear_names()}
            caps = self._capture(block, spec, inputs)
            for g in spec.table.groups:
                row = self._search_and_apply_scale(block, spec, g, caps[g.role], inputs, cfgs)
                if row:
                    scales.append({"block": i, **row})
            if fp_inputs:   # X_i's statistics and X_{i+1} from one pass of the scaled fp block
                stats = collect_block_stats(block, inputs, spec.table.linear_names(),
                                            estimator=self.config.range_estimator,
                                            advance=i + 1 < n_blocks)
            if self.config.clip:
                for g in spec.table.groups:
                    self._clip_group(block, g, caps[g.role].X, cfgs)
            del caps
            if not fp_inputs:
                stats = collect_block_stats(block, inputs, spec.table.linear_names(),
                                            estimator=self.config.range_estimator)
            for rel, st in stats.items():
                all_stats[f"{prefix}.{i}.{rel}"] = st
                if cfgs[rel] is not None:
                    replace_linear(block, rel, round_and_wrap(
                        block.get_submodule(rel), cfgs[rel], act_range=st.static_range))

        store = torch.device("cpu") if self.config.offload_inputs else None
        walk_blocks(model, spec, calib, on_block, desc="awq blocks", store_device=store,
                    advance=not fp_inputs)
        self.artifacts["activation_stats"] = stats_table(all_stats)
        self.artifacts["awq_scales"] = scales
        return model

    @torch.no_grad()
    def _capture(self, block: nn.Module, spec: ModelSpec, inputs: BlockInputs
                 ) -> dict[str, _GroupCapture]:
        cap = _Capturer(block, list(spec.table.groups), inputs.store_device)
        try:
            for x, kw in inputs.samples():
                block(x, **kw)
        finally:
            cap.remove()
        return cap.caps

    def _foldable(self, block: nn.Module, spec: ModelSpec, g: LinearGroup) -> tuple[bool, str]:
        if g.feeder is None or g.feeder_kind == "none":
            return False, "no feeder to fold into"
        if g.feeder_kind == "linear":
            if not self.config.fold_linear:
                return False, "fold_linear=false"
            if needs_kv_sharing(block, g) and not self.config.gqa_shared_scale:
                return False, (f"GQA (feeder rows repeated {spec.kv_repeat}x); "
                               "gqa_shared_scale=false")
        return True, ""

    @torch.no_grad()
    def _search_and_apply_scale(self, block: nn.Module, spec: ModelSpec, g: LinearGroup,
                                cap: _GroupCapture, inputs: BlockInputs,
                                cfgs: dict[str, AWQConfig | None]) -> dict[str, Any] | None:
        ok, why = self._foldable(block, spec, g)
        if not ok:
            log.debug("awq: no scale for %s (%s)", g.role, why)
            return None
        c = self.config
        dev = inputs.compute_device
        linears = {n: block.get_submodule(n) for n in g.linears}
        quantized = {n: cfgs[n] for n in g.linears if cfgs[n] is not None}
        K = next(iter(linears.values())).in_features
        x_mean = torch.zeros(K, device=dev)
        n_tok = 0
        for X in cap.X:
            X = X.to(dev).reshape(-1, K).float()
            x_mean += X.abs().sum(0)
            n_tok += X.shape[0]
        shared = needs_kv_sharing(block, g)      # v -> o under GQA: s equal across repeats
        x_mean = x_mean / n_tok
        if shared:
            x_mean = share_across_kv_repeat(x_mean, spec, reduce="mean")
        w_mean = None
        if c.duo_scaling:
            W = torch.cat([lin.weight.float() for lin in linears.values()], 0)
            gs = c.group_size or K
            Wg = W.abs().view(W.shape[0], -1, gs)
            w_mean = (Wg / Wg.amax(-1, keepdim=True).clamp_min(1e-8)).view(W.shape[0], K).mean(0)
            if shared:
                w_mean = share_across_kv_repeat(w_mean, spec, reduce="mean")
        mod = block.get_submodule(inspect_path(g)) if inspect_path(g) else block
        originals = {n: lin.weight.data.clone() for n, lin in linears.items()}
        ratios = c.ratios()
        scales = []
        for r in ratios:
            s = x_mean.pow(r).clamp_min(1e-4)
            if w_mean is not None:
                s = s / w_mean.pow(1 - r).clamp_min(1e-4)
            scales.append(s / (s.max() * s.min()).sqrt())

        def scaled_quantized(n: str, s: Tensor) -> Tensor:
            """Q(W diag(s)) diag(s)^-1 of linear n, in W's dtype."""
            W, cn = originals[n], quantized[n]
            return fake_quantize_weight(W * s.to(W).unsqueeze(0), cn.w_bits, cn.group_size,
                                        cn.symmetric, grid=cn.w_grid) / s.to(W).unsqueeze(0)

        shortlist = self._gram_shortlist(g, mod, quantized, cap, scales, originals,
                                         scaled_quantized, dev)
        evaluate = range(len(ratios)) if shortlist is None else sorted({0, *shortlist})
        losses: dict[int, float] = {}
        best, best_i = float("inf"), None
        for i in evaluate:
            for n in quantized:
                linears[n].weight.data = scaled_quantized(n, scales[i])
            err, count = 0.0, 0
            for X, call, Y in zip(cap.X, cap.calls, cap.Y, strict=True):
                out = _call(mod, X.to(dev), _to(call, dev))
                err += float((out.float() - Y.to(dev).float()).pow(2).sum())
                count += out.numel()
            losses[i] = err / count
            if losses[i] < best:
                best, best_i = losses[i], i
        for n, W in originals.items():
            linears[n].weight.data = W
        if best_i is None:
            raise FloatingPointError(f"awq: every scale candidate of {g.role} gave a non-finite "
                                     "loss; check the calibration inputs")
        best_s = scales[best_i]
        self._apply_scale(block, spec, g, best_s)
        cap.X[:] = [X / best_s.to(X) for X in cap.X]
        return {"group": g.role, "ratio": ratios[best_i], "loss": best, "loss_r0": losses[0],
                "s_max": float(best_s.max()), "s_min": float(best_s.min()),
                "forward_evals": len(losses)}

    @torch.no_grad()
    def _gram_shortlist(self, g: LinearGroup, mod: nn.Module, quantized: dict[str, AWQConfig],
                        cap: _GroupCapture, scales: list[Tensor], originals: dict[str, Tensor],
                        scaled_quantized: Callable[[str, Tensor], Tensor], dev: torch.device
                        ) -> list[int] | None:
        """Candidates whose output loss must be computed, for a group of one linear scored on
        its own output (down_proj; o_proj without GQA); None: compute every candidate's.

        For one linear the loss is ||X dW^T||^2 / (T N) with dW = W_hat(s) - W, which
        tr(dW G dW^T) with G = X^T X [K, K] gives without a forward over the T tokens. The
        candidates within GRAM_RTOL of the smallest such value (rounding in either loss is
        orders of magnitude below it) are then scored exactly as the full search scores
        them: the same choice and the same recorded losses from a few forwards instead of
        n_grid. Used when the Gram matrix is cheaper than the forwards it saves."""
        if len(g.linears) != 1 or inspect_path(g) != g.linears[0] or g.linears[0] not in quantized:
            return None
        name = g.linears[0]
        N, K = originals[name].shape
        T = sum(X.numel() // K for X in cap.X)
        n = len(scales)
        if T * K * K + n * N * K * K >= (n - 2) * T * K * N:
            return None
        G = torch.zeros(K, K, dtype=torch.float32, device=dev)
        count = 0
        for X in cap.X:
            count = add_to_hessian(G, count, X.to(dev))
        W = originals[name].float()
        approx = []
        for s in scales:
            dW = scaled_quantized(name, s).float() - W                         # [N, K]
            approx.append(float(((dW @ G) * dW).sum()))
        if not all(math.isfinite(v) for v in approx):
            return None
        low = min(approx)
        return [i for i, v in enumerate(approx) if v <= low + GRAM_RTOL * abs(low)]

    def _apply_scale(self, block: nn.Module, spec: ModelSpec, g: LinearGroup, s: Tensor
                     ) -> None:
        """Fold s in the weights' own dtype (dtype=None), as the search scored it."""
        feeder = block.get_submodule(g.feeder)
        if g.feeder_kind == "norm":
            fold_into_norm(feeder, s, spec.table.norm_kind, dtype=None)
        else:       # s is equal across the repeats: fold one copy per feeder row
            rows = kv_rows_from_o_channels(s, spec) if needs_kv_sharing(block, g) else s
            if rows is None:
                raise AssertionError(f"awq: {g.role} scale not shared across the kv repeats")
            fold_into_linear_rows(feeder, rows, dtype=None)
        for n in g.linears:
            scale_linear_columns(block.get_submodule(n), s, dtype=None)

    @torch.no_grad()
    def _clip_group(self, block: nn.Module, g: LinearGroup, Xs: list[Tensor],
                    cfgs: dict[str, AWQConfig | None]) -> None:
        c = self.config
        todo = [n for n in g.linears if n not in c.clip_skip and cfgs[n] is not None]
        if not todo:
            return
        lin0 = block.get_submodule(todo[0])
        K = lin0.in_features
        X = torch.cat([x.reshape(-1, K) for x in Xs], 0)
        X = X[:: max(1, X.shape[0] // c.clip_n_tokens)].to(lin0.weight.device).float()
        for n in todo:
            lin = block.get_submodule(n)
            lin.weight.data = awq_clip(lin.weight.data, X, cfgs[n]).to(lin.weight.dtype)


@torch.no_grad()
def awq_clip(W: Tensor, X: Tensor, cfg: AWQConfig, oc_batch: int = 64) -> Tensor:
    """W [N, K] clamped to +-max per (output channel, group) where max = max|W_group| *
    (1 - i / n_grid) minimises the MSE of the group partial sums X_g W_g^T over X [T, K]."""
    N, K = W.shape
    gs = cfg.group_size or K
    Xg = X.view(X.shape[0], K // gs, gs)                                   # [T, G, g]
    out = torch.empty_like(W, dtype=torch.float32)
    for o in range(0, N, oc_batch):
        Wg = W[o:o + oc_batch].float().view(-1, K // gs, gs)               # [n, G, g]
        ref = torch.einsum("tGg,nGg->ntG", Xg, Wg)
        org_max = Wg.abs().amax(-1, keepdim=True)                          # [n, G, 1]
        best_max = org_max.clone()
        best_err = torch.full_like(org_max, float("inf"))
        for i in range(int(cfg.clip_max_shrink * cfg.clip_n_grid)):
            max_val = org_max * (1 - i / cfg.clip_n_grid)
            Wc = torch.clamp(Wg, -max_val, max_val)
            Wq = fake_quantize_weight(Wc.reshape(-1, K), cfg.w_bits, cfg.group_size,
                                      cfg.symmetric, grid=cfg.w_grid).view_as(Wg)
            err = (torch.einsum("tGg,nGg->ntG", Xg, Wq) - ref).pow(2).mean(1).unsqueeze(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        out[o:o + oc_batch] = torch.clamp(Wg, -best_max, best_max).view(-1, K)
    return out


def _to(call: tuple[bool, dict[str, Any]], dev: torch.device) -> tuple[bool, dict[str, Any]]:
    return call[0], to_device(call[1], dev)

