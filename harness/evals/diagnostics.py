"""Diagnostics: which layers lose accuracy, and why.

`distributions`: per block linear, weight W vs W_hat (max, |W| percentiles, kurtosis, MSE,
SQNR) and its input X through the fp reference model vs the quantized model on the same
eval windows (max, percentiles, kurtosis, top-k channel maxima, SQNR of the effective
quantized input and of the linear's output). Plots: activation max per layer x channel
(log colour) and histograms of the linears with the lowest weight SQNR.

`sensitivity`: quantize one group at a time with the method under test (its declared
`Method.quantize_only`: all other block linears in full precision) and record the
perplexity increase over the fp model: each block, each linear type (family-table role),
attention vs MLP.

Both need the fp model: their eval configs set `needs_reference_model: true`, and the
pipeline passes a copy made before quantization as ctx.reference_model.
SQNR(dB) = 10 log10(sum ref^2 / sum (ref - quantized)^2).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.evals import EvalContext, EvalResult, MetricInfo
from harness.evals.ppl import make_windows, perplexity, tokenize_text
from harness.inputs.data import eval_text
from methods.arch import ModelSpec, sublayer_of
from methods.base import Method, matches_any
from methods.layers import FakeQuantLinear, iter_block_linears
from methods.primitives import fake_quantize_activation
from methods.transformed import TransformedLinear

log = logging.getLogger(__name__)

PERCENTILES = (99.0, 99.9)
QUANTILE_SAMPLE = 1 << 22      # torch.quantile limit is 2^24 elements; subsample above this
HIST_SAMPLE = 1 << 16          # values kept per window for histograms


# ---------------------------------------------------------------- shared helpers

def reference_model(ctx: EvalContext) -> nn.Module:
    ref = ctx.reference_model
    if ref is None:
        raise ValueError("this evaluator needs the full-precision model: set "
                         "`needs_reference_model: true` in its eval config")
    return ref


def eval_windows(ctx: EvalContext, cfg: Any) -> Tensor:
    """The first max_windows windows of seqlen tokens of cfg.dataset ([n, seqlen])."""
    text = eval_text(cfg.dataset, ctx.data_dir, bool(cfg.get("allow_hub", False)))
    bos = ctx.tokenizer.bos_token_id if ctx.spec.table.needs_bos else None
    windows = make_windows(tokenize_text(ctx.tokenizer, text), int(cfg.seqlen), bos)
    cap = cfg.get("max_windows")
    return windows[: int(cap)] if cap else windows


def sqnr_db(signal: float, noise: float) -> float | None:
    """None when there is no error (fp-kept linears), so tables stay JSON."""
    if noise <= 0:
        return None
    return 10 * math.log10(max(signal, 1e-30) / noise)


def _subsample(flat: Tensor, n: int, gen: torch.Generator) -> Tensor:
    if flat.numel() <= n:
        return flat
    return flat[torch.randint(flat.numel(), (n,), generator=gen)]


def abs_percentiles(values: Tensor, gen: torch.Generator) -> dict[str, float]:
    flat = _subsample(values.detach().abs().flatten().float(), QUANTILE_SAMPLE, gen)
    q = torch.quantile(flat, torch.tensor([p / 100 for p in PERCENTILES]))
    return {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, q, strict=True)}


@dataclass
class Moments:
    """Streaming statistics of a tensor's values X [..., K]: max|X|, per-channel max|X_j|,
    raw moments (float64) for Pearson kurtosis E[(x - mu)^4] / var^2 (normal: 3), and a
    random subsample for percentiles and histograms."""

    n: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0] * 4)
    channel_max: Tensor | None = None
    sample: list[Tensor] = field(default_factory=list)

    def update(self, x: Tensor, gen: torch.Generator) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        cmax = x.abs().amax(dim=0).cpu()
        self.channel_max = cmax if self.channel_max is None else torch.maximum(
            self.channel_max, cmax)
        d = x.double()
        for i in range(4):
            self.sums[i] += float((d ** (i + 1)).sum())
        self.n += x.numel()
        self.sample.append(_subsample(x.flatten().cpu(), HIST_SAMPLE, gen))

    @property
    def max(self) -> float:
        return float(self.channel_max.max())

    def kurtosis(self) -> float:
        mu, m2, m3, m4 = (s / self.n for s in self.sums)
        var = m2 - mu ** 2
        central4 = m4 - 4 * mu * m3 + 6 * mu ** 2 * m2 - 3 * mu ** 4
        return central4 / var ** 2 if var > 0 else float("nan")

    def values(self) -> Tensor:
        return torch.cat(self.sample)

    def top_channels(self, k: int) -> list[dict[str, float]]:
        vals, idx = self.channel_max.topk(min(k, self.channel_max.numel()))
        return [{"channel": int(i), "max": float(v)} for v, i in zip(vals, idx, strict=True)]


@dataclass
class PairError:
    """sum ref^2 and sum (ref - quantized)^2 over every captured element."""
    signal: float = 0.0
    noise: float = 0.0

    def update(self, ref: Tensor, quant: Tensor) -> None:
        ref, quant = ref.double(), quant.double()
        self.signal += float((ref ** 2).sum())
        self.noise += float(((ref - quant) ** 2).sum())

    @property
    def db(self) -> float | None:
        return sqnr_db(self.signal, self.noise)


def effective_input(module: nn.Module, x: Tensor) -> Tensor:
    """The input the weights actually multiply, in the input's own units: smoothing and
    activation fake-quant applied, smoothing divided back out."""
    if not isinstance(module, FakeQuantLinear) or module.a_bits >= 16:
        return x
    if isinstance(module, TransformedLinear) and module.r_in is not None:
        # quantized in the rotated basis R x: back to x's units with R^T
        xr = module.r_in.apply(x * module.smooth_inv.to(x.dtype)
                               if module.smooth_inv is not None else x)
        xq = module.r_in.apply_t(fake_quantize_activation(xr, module.a_bits, module.act_mode,
                                                          module.act_scale))
        return xq / module.smooth_inv.to(x.dtype) if module.smooth_inv is not None else xq
    s_inv = module.smooth_inv
    xs = x * s_inv.to(x.dtype) if s_inv is not None else x
    xq = fake_quantize_activation(xs, module.a_bits, module.act_mode, module.act_scale)
    return xq / s_inv.to(x.dtype) if s_inv is not None else xq


# ---------------------------------------------------------------- distributions

@dataclass
class LinearDiag:
    """Everything measured for one block linear."""
    block: int
    role: str
    input_key: str                      # linears reading the same X share their input stats
    x_ref: Moments = field(default_factory=Moments)
    x_quant: Moments = field(default_factory=Moments)
    x_err: PairError = field(default_factory=PairError)
    y_err: PairError = field(default_factory=PairError)
    x_eff_sample: list[Tensor] = field(default_factory=list)


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the module's input meets, in the input's basis: W_tilde for a linear whose
    grid lives in a rotated basis (QuIP), else its weight."""
    return module.dense_weight() if isinstance(module, TransformedLinear) else module.weight


def weight_row(W: Tensor, W_hat: Tensor, gen: torch.Generator) -> dict[str, Any]:
    W, W_hat = W.detach().float(), W_hat.detach().float()
    err = PairError()
    err.update(W, W_hat)
    m = Moments()
    m.update(W, gen)
    pct = abs_percentiles(W, gen)
    return {"w_max": float(W.abs().max()), "w_p99": pct["p99"], "w_p99_9": pct["p99.9"],
            "w_kurtosis": m.kurtosis(), "w_mse": float(((W - W_hat) ** 2).mean()),
            "sqnr_w_db": err.db}


@torch.no_grad()
def _capture(model: nn.Module, modules: dict[str, nn.Module], windows: Tensor, on_linear
             ) -> None:
    """Run each window through `model`; on_linear(window, name, module, X, Y) per linear."""
    state = {"w": 0}
    handles = [m.register_forward_hook(
        lambda mod, args, out, n=n: on_linear(state["w"], n, mod, args[0], out))
        for n, m in modules.items()]
    device = next(model.parameters()).device
    try:
        for w in range(len(windows)):
            state["w"] = w
            model(input_ids=windows[w:w + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_distributions(ref: nn.Module, quant: nn.Module, spec: ModelSpec, windows: Tensor,
                          top_k: int = 8, n_worst: int = 4, seed: int = 0
                          ) -> tuple[list[dict[str, Any]], dict[str, LinearDiag], dict]:
    """(rows per linear, diagnostics per linear, samples of the worst linears)."""
    gen = torch.Generator().manual_seed(seed)
    ref_mods = {full: m for _, _, full, m in iter_block_linears(ref, spec)}
    q_mods = {full: m for _, _, full, m in iter_block_linears(quant, spec)}
    diags: dict[str, LinearDiag] = {}
    rows: dict[str, dict[str, Any]] = {}
    for i, rel, full, _ in iter_block_linears(ref, spec):
        group = spec.table.group_of(rel)
        diags[full] = LinearDiag(i, group.role, f"{i}.{group.role}")
        rows[full] = {"linear": full, "block": i, "role": group.role,
                      "w_bits": getattr(q_mods[full], "w_bits", 16),
                      "a_bits": getattr(q_mods[full], "a_bits", 16),
                      **weight_row(ref_mods[full].weight, effective_weight(q_mods[full]), gen)}
    scored = [(r["sqnr_w_db"], n) for n, r in rows.items() if r["sqnr_w_db"] is not None]
    worst = [n for _, n in sorted(scored)[:n_worst]]
    first_of_input = {}
    for full, d in diags.items():
        first_of_input.setdefault(d.input_key, full)

    captured: dict[str, tuple[Tensor, Tensor]] = {}   # fp (X, Y) of the current window
    for w in tqdm(range(len(windows)), desc="distributions", leave=False):
        captured.clear()

        def on_ref(_w, name, mod, x, y):
            captured[name] = (x.detach(), y.detach())
            if first_of_input[diags[name].input_key] == name:
                diags[name].x_ref.update(x, gen)

        def on_quant(_w, name, mod, x, y):
            x_ref, y_ref = captured.pop(name)
            d = diags[name]
            first = first_of_input[d.input_key] == name
            if not (first or name in worst):
                d.y_err.update(y_ref, y.detach())
                return
            x_eff = effective_input(mod, x.detach())
            if first:
                d.x_quant.update(x, gen)
                d.x_err.update(x_ref, x_eff)
            d.y_err.update(y_ref, y.detach())
            if name in worst:
                d.x_eff_sample.append(_subsample(x_eff.flatten().float().cpu(), HIST_SAMPLE,
                                                 gen))

        _capture(ref, ref_mods, windows[w:w + 1], on_ref)
        _capture(quant, q_mods, windows[w:w + 1], on_quant)

    for full, d in diags.items():
        src = diags[first_of_input[d.input_key]]
        rx, qx = src.x_ref, src.x_quant
        pct = abs_percentiles(rx.values(), gen)
        rows[full].update({
            "x_max": rx.max, "x_p99": pct["p99"], "x_p99_9": pct["p99.9"],
            "x_kurtosis": rx.kurtosis(), "x_top_channels": rx.top_channels(top_k),
            "xq_max": qx.max, "xq_kurtosis": qx.kurtosis(),
            "sqnr_x_db": src.x_err.db, "sqnr_y_db": d.y_err.db})
    samples = {n: {"W": ref_mods[n].weight.detach().float().flatten(),
                   "W_hat": q_mods[n].weight.detach().float().flatten(),
                   "X": diags[first_of_input[diags[n].input_key]].x_ref.values(),
                   "X_q": torch.cat(diags[n].x_eff_sample)} for n in worst}
    return list(rows.values()), diags, samples


def distribution_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("sqnr_w_db", "sqnr_x_db", "sqnr_y_db"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            stem = key.removesuffix("_db")
            out[f"{stem}_min_db"] = min(vals)
            out[f"{stem}_mean_db"] = sum(vals) / len(vals)
    out["kurtosis_x_max"] = max(r["x_kurtosis"] for r in rows)
    out["kurtosis_w_max"] = max(r["w_kurtosis"] for r in rows)
    out["x_max"] = max(r["x_max"] for r in rows)
    out["w_mse_mean"] = sum(r["w_mse"] for r in rows) / len(rows)
    return out


def distribution_metric_info(name: str) -> MetricInfo | None:
    """sqnr_{w,x,y}_{min,mean}_db (higher is better), kurtosis_{x,w}_max, x_max, w_mse_mean."""
    if name.startswith("sqnr_") and name.endswith("_db"):
        return MetricInfo("distributions", "distributions", name, "dB", True, subject=name)
    if name in ("kurtosis_x_max", "kurtosis_w_max", "x_max", "w_mse_mean"):
        return MetricInfo("distributions", "distributions", name, subject=name)
    return None


def plot_activation_heatmap(diags: dict[str, LinearDiag], spec: ModelSpec, path: Path,
                            title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    roles = [g.role for g in spec.table.groups]
    by_role: dict[str, dict[str, list[Tensor]]] = {r: {"fp": [], "quantized": []} for r in roles}
    seen = set()
    for d in diags.values():
        if d.input_key in seen or d.x_ref.channel_max is None:
            continue
        seen.add(d.input_key)
        by_role[d.role]["fp"].append(d.x_ref.channel_max)
        by_role[d.role]["quantized"].append(d.x_quant.channel_max)
    fig, axes = plt.subplots(2, len(roles), figsize=(4.5 * len(roles), 8), squeeze=False)
    for c, role in enumerate(roles):
        for r, which in enumerate(("fp", "quantized")):
            ax = axes[r][c]
            mat = torch.stack(by_role[role][which]).numpy()
            pos = mat[mat > 0]
            norm = LogNorm(vmin=max(float(pos.min()), 1e-4) if pos.size else 1e-4,
                           vmax=max(float(mat.max()), 1e-3))
            im = ax.imshow(mat, aspect="auto", norm=norm, cmap="magma", interpolation="nearest")
            ax.set_title(f"{role} input, {which}")
            ax.set_xlabel("channel")
            ax.set_ylabel("block")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(im, ax=ax, label="max |X_j|")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_worst_histograms(samples: dict[str, dict[str, Tensor]], rows: dict[str, dict],
                          path: Path, title: str) -> Path | None:
    if not samples:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 2, figsize=(11, 2.8 * len(samples)), squeeze=False)
    for r, (name, s) in enumerate(samples.items()):
        row = rows[name]
        for c, (a, b, label, db) in enumerate((("W", "W_hat", "weight", row["sqnr_w_db"]),
                                                ("X", "X_q", "input", row["sqnr_x_db"]))):
            ax = axes[r][c]
            lo = float(torch.minimum(s[a].min(), s[b].min()))
            hi = float(torch.maximum(s[a].max(), s[b].max()))
            bins = torch.linspace(lo, hi if hi > lo else lo + 1, 121).numpy()
            ax.hist(s[a].numpy(), bins=bins, alpha=0.6, label=f"{a} (fp)", log=True)
            ax.hist(s[b].numpy(), bins=bins, alpha=0.6, label=f"{b} (quantized)", log=True)
            db_txt = "exact" if db is None else f"{db:.1f} dB"
            ax.set_title(f"{name} {label}: SQNR {db_txt}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_distributions(ctx: EvalContext, cfg: Any) -> EvalResult:
    t0 = time.perf_counter()
    if ctx.method is not None and ctx.method.rewrites_model:
        raise ValueError(f"{ctx.method_name} rewrites the model outside its linears (rotated "
                         "residual stream): per-linear comparisons with the fp model would "
                         "compare different bases")
    ref = reference_model(ctx)
    windows = eval_windows(ctx, cfg)
    rows, diags, samples = measure_distributions(
        ref, ctx.model, ctx.spec, windows, int(cfg.get("top_k_channels", 8)),
        int(cfg.get("n_worst", 4)))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    title = f"{ctx.spec.name} / {ctx.method_name}"
    heat = plot_activation_heatmap(diags, ctx.spec, ctx.run_dir / "activation_max_heatmap.png",
                                   title)
    hist = plot_worst_histograms(samples, {r["linear"]: r for r in rows},
                                 ctx.run_dir / "worst_linear_histograms.png", title)
    metrics = distribution_metrics(rows)
    log.info("distributions: %d linears on %d x %d tokens, min weight SQNR %s dB", len(rows),
             *windows.shape, f"{metrics['sqnr_w_min_db']:.1f}" if "sqnr_w_min_db" in metrics
             else "n/a (no quantized weights)")
    plots = {"activation_heatmap": str(heat)}
    if hist is not None:
        plots["worst_histograms"] = str(hist)
    return EvalResult(
        metrics=metrics,
        provenance={"distributions": {"dataset": cfg.dataset, "windows": int(windows.shape[0]),
                                      "seqlen": int(windows.shape[1]),
                                      "worst_linears": list(samples),
                                      "seconds": time.perf_counter() - t0}},
        artifacts={"distributions": rows, "distributions_plots": plots})


# ---------------------------------------------------------------- sensitivity

@dataclass(frozen=True)
class Group:
    name: str
    kind: str                       # block | type | sublayer
    patterns: tuple[str, ...]       # keep_fp patterns that select exactly this group
    members: tuple[str, ...]        # full names of its block linears


def sensitivity_groups(model: nn.Module, spec: ModelSpec,
                       kinds: Sequence[str] = ("block", "type", "sublayer")) -> list[Group]:
    """Groups from the family table: block_<i>, one per linear role, attn / mlp."""
    names = [full for _, _, full, _ in iter_block_linears(model, spec)]
    candidates: list[tuple[str, str, tuple[str, ...]]] = []
    if "block" in kinds:
        candidates += [(f"block_{i}", "block", (f"{spec.table.blocks}.{i}.*",))
                       for i in range(spec.num_layers)]
    if "type" in kinds:
        candidates += [(g.role, "type", g.linears) for g in spec.table.groups]
    if "sublayer" in kinds:
        for sub in ("attn", "mlp"):
            pats = tuple(n for g in spec.table.groups if sublayer_of(g.role) == sub
                         for n in g.linears)
            if pats:
                candidates.append((sub, "sublayer", pats))
    unknown = set(kinds) - {"block", "type", "sublayer"}
    if unknown:
        raise ValueError(f"unknown sensitivity group kinds {sorted(unknown)}; use block, "
                         "type, sublayer")
    return [Group(name, kind, pats, tuple(n for n in names if matches_any(n, pats)))
            for name, kind, pats in candidates]


def quantize_group(method: Method, ref: nn.Module, spec: ModelSpec, group: Group,
                   calib) -> nn.Module:
    """A copy of the fp model with only `group` quantized by `method`'s config."""
    return method.quantize_only(copy.deepcopy(ref), spec, calib, group.members)


def _logprobs(model: nn.Module, window: Tensor) -> Tensor:
    """window [T] -> next-token log-probabilities [T - 1, V] (fp32, on the CPU)."""
    device = next(model.parameters()).device
    logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


@torch.no_grad()
def window_logprobs(model: nn.Module, windows: Tensor, desc: str) -> list[Tensor]:
    """The fp model's log-probabilities per window, kept for KL: n x (T-1) x V x 4 bytes."""
    return [_logprobs(model, w) for w in tqdm(windows, desc=desc, leave=False)]


@torch.no_grad()
def score_against(model: nn.Module, windows: Tensor, ref_logprobs: Sequence[Tensor],
                  desc: str) -> tuple[float, float]:
    """(perplexity, mean per-token KL(p_fp || p_model)) on the same windows; the
    perplexity follows the GPTQ protocol of harness.evals.ppl."""
    nlls, kls = [], []
    for window, ref in tqdm(zip(windows, ref_logprobs, strict=True), total=len(windows), desc=desc,
                            leave=False):
        lp = _logprobs(model, window)
        nlls.append(-lp.gather(1, window[1:, None]).mean())
        kls.append((ref.exp() * (ref - lp)).sum(-1).mean())
    return perplexity(torch.stack(nlls)), float(torch.stack(kls).mean())


def plot_sensitivity(table: Sequence[dict[str, Any]], path: Path, title: str,
                     key: str = "delta_ppl") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("block", "type", "sublayer") if any(r["kind"] == k for r in table)]
    counts = [sum(r["kind"] == k for r in table) for k in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 1.2 + 0.28 * sum(counts) + len(kinds)),
                             gridspec_kw={"height_ratios": counts}, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        rows = [r for r in table if r["kind"] == kind]
        if kind == "block":
            rows = sorted(rows, key=lambda r: int(r["group"].rpartition("_")[2]))
        ax.barh([r["group"] for r in rows], [r[key] for r in rows],
                color={"block": "tab:blue", "type": "tab:orange",
                       "sublayer": "tab:green"}[kind])
        ax.invert_yaxis()
        ax.set_title(f"{kind}: {key} when only this group is quantized", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[-1, 0].set_xlabel({"delta_ppl": "perplexity increase over fp",
                            "kl": "mean KL(p_fp || p_quantized) per token"}[key])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sensitivity_metric_info(name: str) -> MetricInfo | None:
    """sens_<group>: perplexity increase when only that group is quantized; sens_kl_<group>:
    mean KL to the fp model; sens_ppl_fp / sens_ppl_quantized / sens_kl_quantized."""
    if not name.startswith("sens_"):
        return None
    kl = name.startswith("sens_kl_")
    group = name.removeprefix("sens_kl_" if kl else "sens_")
    label = {"sens_ppl_fp": "ppl fp", "sens_ppl_quantized": "ppl quantized"}.get(
        name, f"{'KL' if kl else 'Δ ppl'} {group}")
    return MetricInfo("sensitivity", "sensitivity", label, subject=group)


def evaluate_sensitivity(ctx: EvalContext, cfg: Any) -> EvalResult:
    t_start = time.perf_counter()
    ref = reference_model(ctx)
    method = ctx.method
    if method is None:
        raise ValueError("the sensitivity evaluator re-quantizes with the run's method: "
                         "EvalContext.method is None (an fp model has nothing to rank)")
    calib = ctx.calib
    if calib is not None and cfg.get("calib_samples"):
        calib = calib[: int(cfg.calib_samples)]
    windows = eval_windows(ctx, cfg)
    rank_by = str(cfg.get("rank_by", "delta_ppl"))
    if rank_by not in ("delta_ppl", "kl"):
        raise ValueError(f"sensitivity rank_by={rank_by!r}; use delta_ppl or kl")
    ref_lp = window_logprobs(ref, windows, "sensitivity fp")
    ppl_fp = perplexity(torch.stack([-lp.gather(1, w[1:, None]).mean()
                                     for w, lp in zip(windows, ref_lp, strict=True)]))
    ppl_quant, kl_quant = score_against(ctx.model, windows, ref_lp, "sensitivity quantized")
    groups = sensitivity_groups(ref, ctx.spec, tuple(cfg.get("groups") or
                                                     ("block", "type", "sublayer")))
    log.info("sensitivity: %d groups x (quantize + %d windows of %d) with %s; fp ppl %.3f, "
             "fully quantized %.3f", len(groups), *windows.shape, method.name, ppl_fp, ppl_quant)
    table = []
    for g in tqdm(groups, desc="sensitivity groups"):
        t0 = time.perf_counter()
        model = quantize_group(method, ref, ctx.spec, g, calib)
        ppl, kl = score_against(model, windows, ref_lp, f"score {g.name}")
        del model
        table.append({"group": g.name, "kind": g.kind, "patterns": list(g.patterns),
                      "n_linears": len(g.members), "ppl": ppl, "delta_ppl": ppl - ppl_fp,
                      "rel_delta": ppl / ppl_fp - 1, "kl": kl,
                      "seconds": time.perf_counter() - t0})
        log.info("sensitivity %s: ppl %.3f (%+.3f), KL %.4f", g.name, ppl, ppl - ppl_fp, kl)
    table.sort(key=lambda r: -r[rank_by])
    for rank, r in enumerate(table, 1):
        r["rank"] = rank
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_sensitivity(table, ctx.run_dir / "sensitivity.png",
                            f"{ctx.spec.name} / {ctx.method_name} ({cfg.dataset}, "
                            f"{windows.shape[0]}x{windows.shape[1]})", rank_by)
    metrics = {f"sens_{r['group']}": r["delta_ppl"] for r in table}
    metrics.update({f"sens_kl_{r['group']}": r["kl"] for r in table})
    metrics.update(sens_ppl_fp=ppl_fp, sens_ppl_quantized=ppl_quant, sens_kl_quantized=kl_quant)
    return EvalResult(
        metrics=metrics,
        provenance={"sensitivity": {
            "dataset": cfg.dataset, "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "groups": len(groups), "rank_by": rank_by,
            "recalibrated_per_group": method.needs_calibration,
            "calib_samples": len(calib) if calib is not None and method.needs_calibration
            else 0, "seconds": time.perf_counter() - t_start}},
        artifacts={"sensitivity": table, "sensitivity_plot": str(plot)})
