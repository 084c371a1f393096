"""Benchmark output: markdown table, speedup / roofline plot, JSON, geometric-mean summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from kernels.bench.gemm import traffic_bytes

TABLE_COLS = ["fp16", "w4a8", "w4a8+quant", "w4a8_2l", "w4a8_2l+quant", "w8a8", "w8a8+quant",
              "w8a8_int_mm"]


def markdown_table(rows: list[dict], peaks: dict | None) -> str:
    head = ["model", "N x K", "M"] + [f"{c} us (x)" for c in TABLE_COLS]
    head += ["w4a8 GB/s" + (" (%peak)" if peaks else ""), "w8a8 TOPS" + (" (%peak)" if peaks else "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['N']}x{r['K']}", str(r["M"])]
        for c in TABLE_COLS:
            t = r["ms"].get(c)
            sp = r["speedup_vs_fp16"].get(c)
            cells.append("-" if t is None else f"{t * 1e3:.1f}" + (f" ({sp:.2f}x)" if sp and c != "fp16" else ""))
        for name, key, pkey in (("w4a8", "gbs", "pct_peak_bw"), ("w8a8", "tops", "pct_peak_int8")):
            v = r[key].get(name)
            pct = r[pkey].get(name)
            cells.append("-" if v is None else f"{v:.0f}" + (f" ({pct:.0f}%)" if pct is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(result: dict, path: str | os.PathLike) -> bool:
    """Speedup-vs-M and roofline (TOPS vs arithmetic intensity) plots; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, peaks = result["gemm"], result["env"].get("peaks")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for n, k in sorted({(r["N"], r["K"]) for r in rows}):
        sel = [r for r in rows if (r["N"], r["K"]) == (n, k) and "w4a8+quant" in r["speedup_vs_fp16"]]
        if sel:
            ax1.plot([r["M"] for r in sel], [r["speedup_vs_fp16"]["w4a8+quant"] for r in sel],
                     marker="o", label=f"{n}x{k}")  # fmt: skip
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xscale="log", xlabel="M (tokens)", ylabel="speedup vs fp16",
            title="W4A8 (incl. activation quant) vs cuBLAS fp16")  # fmt: skip
    ax1.legend(fontsize=7)
    for name, marker in (("fp16", "s"), ("w4a8", "o"), ("w8a8", "^"), ("w8a8_int_mm", "x")):
        pts = [(2.0 * r["M"] * r["N"] * r["K"] / traffic_bytes(name, r["M"], r["N"], r["K"]), r["tops"][name])
               for r in rows if name in r["tops"]]  # fmt: skip
        if pts:
            ax2.scatter(*zip(*pts, strict=True), marker=marker, label=name, s=14)
    if peaks:
        ai = [10 ** (i / 10) for i in range(0, 50)]
        for lim, style in ((peaks["int8_tops"], "--"), (peaks["fp16_tflops"], ":")):
            ax2.plot(ai, [min(lim, a * peaks["hbm_gbs"] / 1e3) for a in ai], style, color="k", lw=0.8)
    ax2.set(xscale="log", yscale="log", xlabel="ops / DRAM byte", ylabel="T(FL)OPS",
            title=f"roofline: {result['env'].get('device')}")  # fmt: skip
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_json(result: dict, out: str | None) -> None:
    if not out:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out}")


def summary(rows: list[dict]) -> dict:
    """Geometric-mean speedup vs fp16 per variant, split decode (M <= 16) / prefill."""
    out = {}
    for regime, pred in (("decode_M<=16", lambda m: m <= 16), ("prefill_M>=256", lambda m: m >= 256)):
        for name in TABLE_COLS[1:]:
            vals = [r["speedup_vs_fp16"][name] for r in rows if pred(r["M"]) and name in r["speedup_vs_fp16"]]
            if vals:
                out[f"{regime}/{name}"] = math.exp(sum(map(math.log, vals)) / len(vals))
    return out

