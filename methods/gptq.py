"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"; reference: IST-DASLab/gptq gptq.py).

For each linear W [N, K] with calibration inputs X [n, K], GPTQ minimises
||W X^T - W_hat X^T||^2 column by column: quantize column j, then spread its error
e_j = (w_j - q_j) / [H^-1]_jj over the not-yet-quantized columns with the row
[H^-1]_{j, j:} of the upper Cholesky factor of H^-1, H = 2/n sum X X^T + lambda I.
Updates are applied lazily in blocks of `block_size` columns.

    solver = GPTQSolver(W)                # lifecycle: accumulate -> solve -> free
    solver.add_batch(X)                   # any number of [.., K] batches
    W_hat, qparams, info = solver.solve(bits=4, group_size=128, ...)
    solver.free()

The solver is public so other methods (FPTQ) reuse it on their own transformed W.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from methods.arch import ModelSpec
from methods.base import Calib, ConfigError, LinearStats, Method, QuantConfig, register
from methods.blockwise import (
    BlockInputs,
    HessianAccumulator,
    StatsAccumulator,
    add_to_hessian,
    chain_hooks,
    run_block_hooked,
    shared_input_sources,
    stats_table,
    walk_blocks,
)
from methods.layers import FakeQuantLinear, config_for, replace_linear, round_and_wrap
from methods.primitives import Grid, QParams, compute_qparams, mse_clip_ratio, qrange

log = logging.getLogger(__name__)


class CholeskyError(RuntimeError):
    """H + lambda I stayed non positive-definite after every damping retry."""


@dataclass(frozen=True)
class GPTQSolverConfig:
    """Settings of `GPTQSolver.solve` beyond the grid; a method that runs the solver on its
    own weights (FPTQ) holds one as a nested config node."""
    damp: float = 0.01               # lambda = damp * mean(diag H)
    block_size: int = 128            # columns per lazy-update block
    act_order: bool = True           # quantize columns in order of decreasing diag(H)
    static_groups: bool = True       # group scales from W before reordering (act_order + groups)
    max_damp_retries: int = 4        # Cholesky failure: damp x10 up to this many times

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ConfigError(f"gptq damp={self.damp} must be > 0 (paper: 0.01 x mean diag H)")
        if self.block_size < 1:
            raise ConfigError(f"gptq block_size={self.block_size} must be >= 1 (paper: 128)")
        if self.max_damp_retries < 0:
            raise ConfigError("gptq max_damp_retries must be >= 0")

    def check_groups(self, group_size: int | None) -> None:
        if self.act_order and group_size and not self.static_groups:
            raise ConfigError("gptq act_order with group-wise scales needs static_groups=true: "
                              "dynamic groups over reordered columns need a per-column group "
                              "index that the [N, K/g] scale layout cannot hold")

    def solve_kwargs(self) -> dict[str, Any]:
        return {"act_order": self.act_order, "static_groups": self.static_groups,
                "block_size": self.block_size, "damp": self.damp,
                "max_retries": self.max_damp_retries}


@dataclass(frozen=True)
class GPTQConfig(QuantConfig, GPTQSolverConfig):
    """QuantConfig + the solver settings (damp, block_size, act_order, static_groups,
    max_damp_retries) as flat fields of the method."""
    group_size: int | None = 128
    true_sequential: bool = True     # q/k/v, then o, then gate/up, then down per block
    offload_inputs: bool = False     # keep block inputs on CPU between blocks (large models)

    def __post_init__(self) -> None:
        QuantConfig.__post_init__(self)
        GPTQSolverConfig.__post_init__(self)
        self.check_groups(self.group_size)

    @property
    def solver(self) -> GPTQSolverConfig:
        return GPTQSolverConfig(**{f.name: getattr(self, f.name)
                                   for f in dataclasses.fields(GPTQSolverConfig)})


class GPTQSolver:
    """Second-order weight rounding for one linear; names follow the paper (W, H, Q, E)."""

    def __init__(self, W: Tensor):
        self.W = W.detach()                         # [N, K], any float dtype; left untouched
        self.K = W.shape[1]
        self.H: Tensor | None = torch.zeros(self.K, self.K, dtype=torch.float32,
                                            device=W.device)
        self.n = 0

    def add_batch(self, X: Tensor) -> None:
        """Running mean H = 2/n sum_t x_t x_t^T over the tokens of X [.., K]."""
        if self.H is None:
            raise RuntimeError("GPTQSolver.add_batch after free()")
        self.n = add_to_hessian(self.H, self.n, X)

    def set_hessian(self, H: Tensor, n: int) -> None:
        self.H, self.n = H.float().to(self.W.device), n

    def free(self) -> None:
        self.H = None

    def _inverse_cholesky(self, H: Tensor, damp: float, max_retries: int
                          ) -> tuple[Tensor, float, int]:
        """Upper Cholesky factor of (H + lambda I)^-1; lambda grows x10 on failure."""
        mean_diag = float(torch.diag(H).mean())
        for retry in range(max_retries + 1):
            rel = damp * 10 ** retry
            try:
                # one K x K temporary at a time besides H and U (each freed once used)
                H_damped = H.clone()
                H_damped.diagonal().add_(rel * mean_diag)
                L = torch.linalg.cholesky(H_damped)
                del H_damped
                Hinv = torch.cholesky_inverse(L)
                del L
                U = torch.linalg.cholesky(Hinv, upper=True)
                del Hinv
                if torch.isfinite(U).all():
                    if retry:
                        log.warning("gptq: H not positive definite at damp %.3g; succeeded "
                                    "with damp %.3g after %d retries", damp, rel, retry)
                    return U, rel, retry
            except torch.linalg.LinAlgError:
                pass
            log.warning("gptq: Cholesky of H + %.3g*mean(diag H)*I failed; retrying with x10",
                        rel)
        raise CholeskyError(
            f"H + lambda I is not positive definite even with damp {damp * 10 ** max_retries:g} "
            f"({max_retries} retries); the calibration inputs are degenerate (check for "
            "constant or non-finite activations) or raise damp / max_damp_retries")

    @torch.no_grad()
    def solve(self, bits: int, group_size: int | None = None, symmetric: bool = True,
              act_order: bool = True, static_groups: bool = True, block_size: int = 128,
              damp: float = 0.01, max_retries: int = 4, grid: Grid = "narrow",
              mse_clip: bool = False
              ) -> tuple[Tensor, QParams, dict[str, Any]]:
        """W_hat [N, K] (dtype of W) on the grid of qparams: scale/zero [N, K/g] per group,
        [N, 1] per channel, and info (damp used, retries, tr(dW H dW^T), dead columns).
        mse_clip: each group's range is shrunk to the clip ratio that minimises its own
        round-trip error (`primitives.mse_clip_ratio`) instead of min-max."""
        if self.H is None or self.n == 0:
            raise RuntimeError("GPTQSolver.solve needs add_batch() calls first")
        if group_size and self.K % group_size:
            raise ValueError(f"group_size {group_size} does not divide K={self.K}")
        if act_order and group_size and not static_groups:
            raise ValueError("act_order with groups needs static_groups")
        N, K = self.W.shape
        W = self.W.float().clone()
        # K x K copies are the solver's memory (127 MB each at K = 5632): self.H stays the
        # undamped H for tr(dW H dW^T); H is a working copy only where it must differ.
        H = self.H
        dead = torch.diag(H) == 0                     # columns never active: set to 0
        if dead.any():
            H = H.clone()
            H[dead, dead] = 1.0
            W[:, dead] = 0.0

        lo, hi = qrange(bits, symmetric)
        g = group_size or K
        # Group scales from the (dead-column-zeroed) W in the original column order.
        ratio = mse_clip_ratio(W, bits, symmetric, "per_group", g, grid=grid) if mse_clip else 1.0
        qp0 = compute_qparams(W, bits, symmetric, "per_group", g, ratio, grid=grid)  # [N, K/g, 1]
        scale = qp0.scale.squeeze(-1)                                         # [N, K/g]
        zero = None if qp0.zero is None else qp0.zero.squeeze(-1)
        dynamic_groups = bool(group_size) and not static_groups

        perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        U, damp_used, retries = self._inverse_cholesky(H, damp, max_retries)
        del H

        # The column loop runs on transposed copies ([columns, N]: each column contiguous);
        # every element sees the same operations in the same order as on W [N, K].
        group_of = ((perm if perm is not None else torch.arange(K, device=W.device)) // g
                    ).tolist()                                   # column (permuted) -> group
        scale_t = scale.t().contiguous()                         # [K/g, N]
        zero_t = None if zero is None else zero.t().contiguous()
        Q_t = torch.zeros(K, N, dtype=W.dtype, device=W.device)
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            W1_t, U1 = W[:, i1:i2].t().contiguous(), U[i1:i2, i1:i2]   # [B, N], [B, B]
            E1_t = torch.zeros_like(W1_t)
            for j in range(i2 - i1):
                col = i1 + j
                if dynamic_groups and col % g == 0:
                    current = torch.cat([W1_t[j:].t(), W[:, i2:]], 1)[:, :g]   # updated W
                    qp = compute_qparams(current, bits, symmetric, "per_channel", grid=grid)
                    scale_t[col // g] = qp.scale[:, 0]
                    if zero_t is not None:
                        zero_t[col // g] = qp.zero[:, 0]
                s = scale_t[group_of[col]]
                z = zero_t[group_of[col]] if zero_t is not None else 0.0
                w = W1_t[j]
                q = torch.round(w / s).add_(z).clamp_(lo, hi).sub_(z).mul_(s)
                Q_t[col] = q
                e = (w - q).div_(U1[j, j])
                W1_t[j:] -= U1[j, j:].unsqueeze(1) * e.unsqueeze(0)
                E1_t[j] = e
            W[:, i2:] -= E1_t.t().contiguous() @ U[i1:i2, i2:]
        Q = Q_t.t().contiguous()
        scale = scale_t.t().contiguous()
        zero = None if zero_t is None else zero_t.t().contiguous()

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        dW = self.W.float() - Q
        # tr(dW H' dW^T) with H' = H + 1 on the dead diagonal (rows / columns of H are zero there)
        err = float(torch.einsum("nk,kl,nl->", dW, self.H, dW) + dW[:, dead].pow(2).sum())
        info = {"damp": damp_used, "retries": retries, "n_tokens": self.n,
                "err_trace": err, "dead_columns": int(dead.sum())}
        if not group_size:                            # per channel: [N, 1]
            scale, zero = scale[:, :1], None if zero is None else zero[:, :1]
        qp = QParams(scale, zero, bits)
        return Q.to(self.W.dtype), qp, info


def gptq_sequence(spec: ModelSpec, true_sequential: bool) -> list[tuple[str, ...]]:
    """Linears quantized together per step: one step per LinearGroup (inputs recomputed
    between steps) or the whole block at once."""
    groups = [g.linears for g in spec.table.groups]
    return groups if true_sequential else [tuple(n for g in groups for n in g)]


@register(GPTQConfig)
class GPTQ(Method[GPTQConfig]):
    name = "gptq"
    supported_bits = frozenset({(4, 16), (3, 16), (8, 16), (4, 8), (2, 16)})

    @property
    def needs_calibration(self) -> bool:
        return True

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        if not calib:
            raise ValueError("gptq needs calibration data (set calib=..., e.g. c4-128x2048)")
        c = self.config
        all_stats: dict[str, LinearStats] = {}
        layers: list[dict[str, Any]] = []
        prefix = spec.table.blocks

        def on_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
            for step in gptq_sequence(spec, c.true_sequential):
                todo = {n: lin_cfg for n in step
                        if (lin_cfg := config_for(c, f"{prefix}.{i}.{n}")) is not None}
                # linears reading one input (q/k/v, gate/up) share its X^T X and max|X_j|
                stats_src = shared_input_sources(spec.table.groups, step)
                hess_src = shared_input_sources(spec.table.groups, list(todo))
                hess = HessianAccumulator(shared=hess_src)
                stats = StatsAccumulator(estimator=c.range_estimator)
                hooks = {n: chain_hooks(*fns) for n in step if (fns := [
                    *([hess] if n in todo and n not in hess_src else []),
                    *([stats] if n not in stats_src else [])])}
                run_block_hooked(block, inputs, hooks)
                found = stats.result()
                for rel in step:
                    if (src := stats_src.get(rel, rel)) in found:
                        all_stats[f"{prefix}.{i}.{rel}"] = found[src]
                for rel, lin_cfg in todo.items():
                    H, n = hess.pop(rel)
                    new, info = self.quantize_linear(block.get_submodule(rel), H, n,
                                                     all_stats[f"{prefix}.{i}.{rel}"], lin_cfg,
                                                     f"{prefix}.{i}.{rel}")
                    replace_linear(block, rel, new)
                    layers.append({"linear": f"{prefix}.{i}.{rel}", **info})

        store = torch.device("cpu") if self.config.offload_inputs else None
        walk_blocks(model, spec, calib, on_block, desc="gptq blocks", store_device=store)
        self.artifacts["activation_stats"] = stats_table(all_stats)
        self.artifacts["gptq_layers"] = layers
        retried = [r["linear"] for r in layers if r["retries"]]
        if retried:
            log.warning("gptq: %d linears needed extra damping: %s", len(retried), retried)
        return model

    def quantize_linear(self, linear: nn.Linear, H: Tensor, n: int, stats: LinearStats,
                        cfg: GPTQConfig | None = None, name: str = ""
                        ) -> tuple[FakeQuantLinear, dict[str, Any]]:
        """Solve `linear` on its Hessian H over n tokens at cfg (the linear's own config
        from `config_for`; default: the method's) and wrap it; name: its full name."""
        c = cfg or self.config
        solver = GPTQSolver(linear.weight.data)
        solver.set_hessian(H, n)
        W_hat, qp, info = solver.solve(c.w_bits, c.group_size, c.symmetric, grid=c.w_grid,
                                       **c.solver.solve_kwargs())
        solver.free()
        return round_and_wrap(linear, c, act_range=stats.static_range, solved=(W_hat, qp)), info
