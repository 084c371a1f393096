"""Report plots (matplotlib Agg), each written as PNG and SVG.

One fixed Okabe-Ito colour per method across every plot, labelled axes with units, legends
outside the data. Inputs are the store DataFrame (harness.results.records.records_frame), FPTQ policy
rows from run artifacts, and kernels/bench.py JSON results.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "ptqbench"   # stable clip-path / glyph ids in SVGs
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from harness.evals import metric_info  # noqa: E402
from harness.evals.lm_eval import COMMONSENSE_AVG  # noqa: E402
from harness.results.alignment import LIBRARY_NATIVE  # noqa: E402
from harness.results.paper_tables import (  # noqa: E402
    ppl_metrics,
    with_commonsense_avg,
)
from harness.results.records import (  # noqa: E402
    BASELINE_METHOD,
    bits_key,
    latest_per_config,
    method_key,
    table_metrics,
    with_method_label,
)

log = logging.getLogger(__name__)

# Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00",
             "#CC79A7")
METHOD_COLORS = {"fp16": "#000000", "rtn": "#E69F00", "smoothquant": "#56B4E9",
                 "gptq": "#009E73", "awq": "#D55E00", "fptq": "#0072B2"}
_EXTRA = ("#CC79A7", "#F0E442", "#999999")


def method_color(method: str) -> str:
    """Fixed colour per method; unknown methods get a stable one from the leftover hues."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]


def save(fig, stem: str | os.PathLike) -> list[Path]:
    """Write <stem>.png and <stem>.svg atomically (temp name, then rename)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    # no creation date: the same records give byte-identical files
    for ext, kw in (("png", {"dpi": 150}), ("svg", {"metadata": {"Date": None}})):
        final = stem.with_suffix(f".{ext}")
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        fig.savefig(tmp, format=ext, bbox_inches="tight", **kw)
        os.replace(tmp, final)
        out.append(final)
    plt.close(fig)
    return out


def _legend_outside(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                  fontsize=8)


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    """Latest ok records, with `method_label` (method and variant) for legends and colours."""
    return with_method_label(latest_per_config(df[df["status"] == "ok"])) if not df.empty else df


# Distinct colours for methods without a fixed one (after METHOD_COLORS' hues) and markers:
# within one figure no two series share both.
SERIES_COLORS = ("#CC79A7", "#56B4E9", "#E69F00", "#009E73", "#0072B2", "#D55E00", "#999999",
                 "#882255", "#44AA99", "#332288", "#AA4499", "#117733")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
PPL_FIGURES = {"main": "", "ablations": "_ablations", "libraries": "_libraries"}  # stem suffix


def ppl_figure_of(method: str, variant: Any) -> str:
    """main: a method at its common setting; ablations: its variants; libraries: reference-
    library baselines (alignment.LIBRARY_NATIVE: conf/method/llmc_*, gptqmodel_*)."""
    if method in LIBRARY_NATIVE:
        return "libraries"
    return "ablations" if isinstance(variant, str) and variant else "main"


def plot_ppl_vs_bits(df: pd.DataFrame, stem: str | os.PathLike) -> dict[str, list[Path]]:
    """Perplexity vs bit width in up to three figures, <stem><suffix> for PPL_FIGURES (returned
    by file stem name): the main methods (one
    colour and marker each, a line joining one method's bit widths), the ablation variants
    and the library baselines (points only, with fp16 and the native methods they vary or
    are compared with for reference). One panel per model x dataset; legend below."""
    ok = _ok(df)
    sets = ppl_metrics(ok)
    if not sets or ok.empty:
        return {}
    variants = ok["variant"] if "variant" in ok.columns else [""] * len(ok)
    ok = ok.assign(figure=[ppl_figure_of(m, v) for m, v in zip(ok["method"], variants,
                                                                strict=True)])
    out = {}
    for kind, suffix in PPL_FIGURES.items():
        shown = ok[ok["figure"] == kind]
        if shown.empty:
            continue
        if kind == "main":
            groups = [("", shown)]
        else:   # one row of panels per varied / compared method, with fp16 and the native
            groups = []     # method(s) at their common setting for reference
            for method in sorted(shown["method"].unique(), key=method_key):
                related = {BASELINE_METHOD, method, *LIBRARY_NATIVE.get(method, ())}
                groups.append((method, pd.concat([
                    ok[(ok["figure"] == "main") & ok["method"].isin(related)],
                    shown[shown["method"] == method]])))
        path = Path(f"{stem}{suffix}")
        out[path.name] = _ppl_panels(groups, sets, path, connect=kind == "main", title={
            "main": "Perplexity vs bit width",
            "ablations": "Ablations: each method's variants vs its common setting",
            "libraries": "Reference-library baselines vs native methods"}[kind])
    return out


def _series_styles(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """label -> (colour, marker), distinct within the figure; fixed colours for known methods
    at their common setting."""
    styles, spare = {}, iter(SERIES_COLORS * 3)
    for i, label in enumerate(labels):
        colour = METHOD_COLORS.get(label) or next(spare)
        styles[label] = (colour, MARKERS[i % len(MARKERS)])
    return styles


def _ppl_panels(groups: Sequence[tuple[str, pd.DataFrame]], metrics: Sequence[str], stem: Path,
                connect: bool, title: str) -> list[Path]:
    """One row of panels (model x dataset) per group; series = method labels, one legend per
    row (below it) so every row's colours and markers are distinct."""
    rows_all = pd.concat([g for _, g in groups])
    panels = [(m, d) for m in sorted(rows_all["model"].unique()) for d in metrics
              if rows_all.loc[rows_all["model"] == m, d].notna().any()]
    if not panels:
        return []
    bits_order = sorted(rows_all["bits"].unique(), key=bits_key)
    width = max(4.0, 0.6 * len(bits_order) + 2.2)
    fig = plt.figure(figsize=(width * len(panels), 4.4 * len(groups)), layout="constrained")
    subfigs = fig.subfigures(len(groups), 1, squeeze=False)[:, 0]
    for subfig, (name, rows) in zip(subfigs, groups, strict=True):
        labels = sorted(rows["method_label"].unique(), key=method_key)
        styles = _series_styles(labels)
        dodge = 0.6 / max(len(labels), 1)
        axes = subfig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (model, d) in zip(axes, panels, strict=True):
            sub = rows[(rows["model"] == model) & rows[d].notna()]
            for k, label in enumerate(labels):
                pts = sub[sub["method_label"] == label].groupby("bits")[d].last()
                xs = [b for b in bits_order if b in pts.index]
                if not xs:
                    continue
                colour, marker = styles[label]
                offset = 0.0 if connect else (k - (len(labels) - 1) / 2) * dodge
                ax.plot([bits_order.index(b) + offset for b in xs], [pts[b] for b in xs],
                        marker=marker, color=colour, label=label, markersize=6,
                        linestyle="-" if connect and label != BASELINE_METHOD else "none",
                        linewidth=1.2, markeredgecolor="black", markeredgewidth=0.4)
            ax.set_xticks(range(len(bits_order)), bits_order)
            ax.set(xlabel="bit width (weights / activations)", yscale="log",
                   title=f"{model}: {metric_info(d).label}")
            ax.grid(alpha=0.3, which="both", axis="y")
        axes[0].set_ylabel("perplexity (log scale)")
        seen: dict[str, Any] = {}       # one legend entry per series over the row's panels
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(label, handle)
        subfig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center",
                      ncol=min(4, len(seen)), frameon=False, fontsize=8)
        if name:
            subfig.suptitle(name, fontsize=10)
    fig.suptitle(title)
    return save(fig, stem)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with lower-or-equal x and higher-or-equal y (x = cost,
    y = quality), sorted by x."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _latency_metric(df: pd.DataFrame) -> str | None:
    """The first prefill latency (smallest batch, then prompt length) the records have."""
    cands = [m for m in table_metrics(df, "latency")
             if metric_info(m).kind == "latency_prefill_ms"]
    return min(cands, key=lambda m: (metric_info(m).batch, metric_info(m).order)) if cands else None


def plot_accuracy_vs_latency(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Average zero-shot accuracy vs prefill latency per method x bits; Pareto front dashed."""
    ok = with_commonsense_avg(_ok(df))
    lat = _latency_metric(ok) if not ok.empty else None
    acc_col = COMMONSENSE_AVG
    if lat is None or not ok[acc_col].notna().any():
        return []
    acc_scale = metric_info(acc_col).scale
    merged = ok.groupby(["model", "method_label", "bits"]).agg({lat: "last", acc_col: "last"})
    merged = merged.dropna().reset_index()
    if merged.empty:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, r in merged.iterrows():
        ax.scatter(r[lat], r[acc_col] * acc_scale, color=method_color(r["method_label"]),
                   s=40, label=r["method_label"], zorder=3)
        ax.annotate(r["bits"], (r[lat], r[acc_col] * acc_scale), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    front = pareto_front(list(zip(merged[lat], merged[acc_col] * acc_scale, strict=True)))
    ax.plot(*zip(*front, strict=True), "--", color="#999999", lw=1, label="Pareto front")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0),
              frameon=False, fontsize=8)
    ax.set(xlabel=f"{metric_info(lat).label}, batch {metric_info(lat).batch}",
           ylabel="zero-shot accuracy, average (%)", title="Accuracy vs latency")
    ax.grid(alpha=0.3)
    return save(fig, stem)


def fptq_thresholds(method_cfg: Any) -> dict[str, float]:
    """FPTQ activation-range thresholds from the method config (keys v0 / v1)."""
    if not isinstance(method_cfg, dict):
        return {}
    return {k: float(method_cfg[k]) for k in ("v0", "v1")
            if isinstance(method_cfg.get(k), (int, float))}


def plot_fptq_policy(rows: Sequence[dict], stem: str | os.PathLike,
                     thresholds: dict[str, float] | None = None, title: str = "") -> list[Path]:
    """FPTQ's own policy plot (methods.fptq.policy_figure) saved as <stem>.png / .svg."""
    if not rows:
        return []
    from methods.fptq import policy_figure

    return save(policy_figure(rows, thresholds or {},
                              title or "FPTQ layer-wise activation policy"), stem)


def load_bench(bench_dir: str | os.PathLike) -> list[tuple[str, dict]]:
    """kernels/bench.py JSON results (files with a `gemm` list) in bench_dir and its
    subfolders (one per device); others are ignored. Stem: the relative path joined by '_'."""
    out = []
    root = Path(bench_dir)
    for f in sorted(root.rglob("*.json")) if root.is_dir() else []:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping unreadable bench file %s: %s", f, e)
            continue
        if isinstance(data, dict) and isinstance(data.get("gemm"), list):
            out.append(("_".join(f.relative_to(root).with_suffix("").parts), data))
    return out


def roofline_speedup(m: int, n: int, k: int, peaks: dict, variant: str = "w4a8+quant") -> float:
    """Upper bound on the speedup vs fp16: each kernel at max(compute, memory) time."""
    from kernels.bench import traffic_bytes

    flops = 2.0 * m * n * k
    t16 = max(flops / (peaks["fp16_tflops"] * 1e12), traffic_bytes("fp16", m, n, k)
              / (peaks["hbm_gbs"] * 1e9))
    tq = max(flops / (peaks["int8_tops"] * 1e12), traffic_bytes(variant, m, n, k)
             / (peaks["hbm_gbs"] * 1e9))
    return t16 / tq


def plot_kernel_speedup(result: dict, stem: str | os.PathLike, variant: str = "w4a8+quant",
                        title: str = "") -> list[Path]:
    """Measured speedup vs fp16 over M per GEMM shape; dotted: the roofline bound (needs the
    device peaks in the JSON env)."""
    rows = [r for r in result.get("gemm", []) if variant in r.get("speedup_vs_fp16", {})]
    if not rows:
        return []
    peaks = (result.get("env") or {}).get("peaks")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    for i, (n, k) in enumerate(shapes):
        sel = sorted((r for r in rows if (r["N"], r["K"]) == (n, k)), key=lambda r: r["M"])
        color = OKABE_ITO[(i + 1) % len(OKABE_ITO)]
        ms = [r["M"] for r in sel]
        ax.plot(ms, [r["speedup_vs_fp16"][variant] for r in sel], marker="o", color=color,
                label=f"N={n} K={k}")
        if peaks:
            ax.plot(ms, [roofline_speedup(m, n, k, peaks, variant) for m in ms], ":",
                    color=color, lw=1)
    ax.axhline(1.0, color="#999999", lw=0.8)
    ax.set(xscale="log", xlabel="M (tokens per GEMM)", ylabel=f"speedup of {variant} vs fp16 (x)",
           title=title or f"{variant} speedup ({(result.get('env') or {}).get('device', '?')})")
    if peaks:
        ax.plot([], [], ":", color="#555555", label="roofline bound")
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax)
    return save(fig, stem)


def plot_cost(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Quantization time (s) and peak memory (MB) per method x bits (fp16 left out)."""
    if df.empty or "time_quantize" not in df.columns:
        return []
    ok = _ok(df)
    ok = ok[(ok["method"] != BASELINE_METHOD) & ok["time_quantize"].notna()]
    if ok.empty:
        return []
    ok = ok.groupby(["model", "method", "method_label", "bits"], as_index=False).last()
    ok = ok.sort_values(["model", "bits", "method_label"],
                        key=lambda s: s.map(method_key) if s.name == "method_label"
                        else s.map(bits_key) if s.name == "bits" else s)
    # one horizontal bar per method x bits, labels on the y axis (never overlapping)
    labels = [f"{r.method_label} {r.bits}" + (f" ({r.model})" if ok["model"].nunique() > 1 else "")
              for r in ok.itertuples()]
    colors = [method_color(m) for m in ok["method"]]
    has_mem = "mem_peak_quantize_mb" in ok.columns and ok["mem_peak_quantize_mb"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6.5,
                                                             1.2 + 0.24 * len(ok)),
                             squeeze=False, sharey=True, layout="constrained")
    y = list(range(len(ok)))
    axes[0][0].barh(y, ok["time_quantize"], color=colors, edgecolor="black", linewidth=0.3)
    axes[0][0].set(xlabel="quantization time (s)", title="Quantization time")
    axes[0][0].set_yticks(y, labels, fontsize=7)
    axes[0][0].invert_yaxis()
    if has_mem:
        axes[0][1].barh(y, ok["mem_peak_quantize_mb"].fillna(0), color=colors,
                        edgecolor="black", linewidth=0.3)
        axes[0][1].set(xlabel="peak memory while quantizing (MB)", title="Quantization memory")
    for ax in axes[0]:
        ax.grid(alpha=0.3, axis="x")
    return save(fig, stem)
