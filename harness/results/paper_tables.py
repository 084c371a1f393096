"""The tables quantization papers print: perplexity (long and wide), zero-shot accuracy,
MMLU, latency and memory, quantization cost, FPTQ's layer policy and superseded runs."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from harness.evals import metric_info
from harness.evals.lm_eval import COMMONSENSE_AVG
from harness.evals.tasks import COMMONSENSE_TASKS
from harness.results.records import (
    BASELINE_METHOD,
    ROW_KEYS,
    bits_key,
    latest_per_config,
    method_key,
    method_label,
    superseded,
    table_metrics,
    with_method_label,
)
from harness.results.tables import (
    Cell,
    Column,
    Notes,
    Table,
    build_table,
    fmt,
    is_num,
    merge_rows,
    rows_for,
    status_cell,
)


def metric_column(metric: str, label: str | None = None, delta: bool = True) -> Column:
    """A table column for a recorded metric, as its evaluator describes it."""
    info = metric_info(metric)
    return Column(label or info.label, metric, lower_is_better=not info.higher_is_better,
                  scale=info.scale, digits=info.digits, delta=delta)


def ppl_metrics(df: pd.DataFrame) -> list[str]:
    """GPTQ-protocol perplexities present (the `ppl` evaluator's; lm-eval's word perplexity
    of LAMBADA is another table), in the papers' dataset order; a dataset whose evaluation
    failed in a partial record still gets its column (the cell names the reason)."""
    found = table_metrics(df, "perplexity")
    for errors in df.get("eval_errors", []):
        if isinstance(errors, dict):
            found += [k for k in errors if k not in found and (info := metric_info(k))
                      is not None and info.table == "perplexity"]
    return sorted(found, key=lambda c: (metric_info(c).order, c))


def perplexity_table(df: pd.DataFrame) -> Table:
    """Rows model x method x bits; one column per dataset (WikiText-2, C4, PTB) plus Δ."""
    cols = [metric_column(m) for m in ppl_metrics(df)]
    rows = rows_for(df, "ppl", [c.metric for c in cols])
    labels = [("model", "Model"), ("method_label", "Method"), ("bits", "Bits")]
    keys: tuple[str, ...] = ROW_KEYS
    if _several_calibrations(rows):     # seeds or sets apart: never merged into one row
        # fp16 uses no calibration: one baseline row whatever its record's calib says
        rows = rows.assign(calib=[("-" if m == BASELINE_METHOD or not isinstance(c, str) else c)
                                  for m, c in zip(rows["method"], rows["calib"], strict=True)])
        labels.append(("calib", "Calib"))
        keys = (*keys, "calib")
    merged = merge_rows(rows, keys, [c.metric for c in cols])
    return build_table(merged, "perplexity", "Perplexity (lower is better)", labels, cols,
                       caption="Perplexity, GPTQ protocol (non-overlapping seqlen windows).")


def _several_calibrations(df: pd.DataFrame) -> bool:
    """More than one calibration setting among the quantized (non-fp16) records."""
    if "calib" not in df.columns:
        return False
    quant = df[df["method"] != BASELINE_METHOD]
    return quant["calib"].dropna().astype(str).nunique() > 1


def perplexity_wide_table(df: pd.DataFrame) -> Table:
    """Paper layout: rows model; columns method x bits x dataset (no Δ: fp16 is a column)."""
    metrics = ppl_metrics(df)
    sub = rows_for(df, "ppl", metrics)
    sub = sub.assign(method=with_method_label(sub)["method_label"], variant="")
    if _several_calibrations(sub):      # one column group per calibration setting
        sub = sub.assign(method=[m if m == BASELINE_METHOD or not isinstance(c, str)
                                 else f"{m} @{c}" for m, c in zip(sub["method"], sub["calib"],
                                                                  strict=True)])
    merged = merge_rows(sub, ("model", "method", "bits"), metrics)
    if merged.empty:
        return Table("perplexity_wide", "Perplexity by method and bits", [], [], 0)
    merged["method"] = [f"{m} [{s}]" if s else m   # settings that split a combo: own column
                        for m, s in zip(merged["method"], merged["setting"], strict=True)]
    combos = sorted({(r.method, r.bits) for r in merged.itertuples()},
                    key=lambda mb: (method_key(mb[0]), bits_key(mb[1])))
    wide = []
    for model, grp in merged.groupby("model", sort=True):
        row = {"model": model, "method": "-", "bits": "-", "status": "ok", "error": None,
               "has_failure": False}
        for _, r in grp.iterrows():
            for d in metrics:
                key = f"{r['method']}|{r['bits']}|{d}"
                row[key] = r.get(d)
                row[f"{key}_stderr"] = r.get(f"{d}_stderr")
                if not is_num(row[key]) and (r["status"] != "ok" or r["has_failure"]):
                    row[f"{key}_status"] = (r["status"] if r["status"] != "ok" else "failed",
                                            r["error"])
        wide.append(row)
    wide_df = pd.DataFrame(wide)
    cols = [Column(f"{m} {b} {metric_info(d).label}", f"{m}|{b}|{d}", delta=False)
            for m, b in combos for d in metrics]
    table = build_table(wide_df, "perplexity_wide", "Perplexity by method and bits",
                        [("model", "Model")], cols, delta=False, baseline=lambda r: False)
    # Missing cells of failed/skipped combos name their status (the row itself is ok).
    notes = Notes()
    notes.items = [f.split("] ", 1)[1] for f in table.footnotes if f.startswith("[")]
    for row, (_, r) in zip(table.rows, wide_df.iterrows(), strict=True):
        for j, c in enumerate(cols, start=1):
            st = r.get(f"{c.metric}_status")
            if isinstance(st, tuple) and row[j].value is None:
                row[j] = status_cell(st[0], st[1], notes)
    # Best per dataset across methods (excluding fp16) instead of per column.
    for row in table.rows:
        for c in row:
            c.bold = False
        for d in metrics:
            idx = [j for j, c in enumerate(cols, start=1)
                   if c.metric.endswith(f"|{d}") and not c.metric.startswith(f"{BASELINE_METHOD}|")]
            vals = [row[j].value for j in idx if row[j].value is not None]
            for j in idx:
                if vals and row[j].value == min(vals):
                    row[j].bold = True
    table.footnotes = ([f"[{i}] {t}" for i, t in enumerate(notes.items, 1)]
                       + [f for f in table.footnotes if not f.startswith("[")])
    table.column_group = len(metrics)      # one method x bits: its datasets side by side
    return table


def accuracy_metrics(df: pd.DataFrame) -> list[str]:
    """Per-task zero-shot accuracies present (acc, not acc_norm; the average excluded)."""
    return table_metrics(df, "accuracy")


def with_commonsense_avg(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """COMMONSENSE_AVG (acc_commonsense_avg) as recorded, else the mean over the task columns (NaN if any task
    is missing: an average over fewer tasks is not comparable)."""
    metrics = list(metrics) if metrics is not None else accuracy_metrics(df)
    df = df.copy()
    if COMMONSENSE_AVG not in df.columns:
        df[COMMONSENSE_AVG] = float("nan")
    if metrics:
        df[COMMONSENSE_AVG] = df[COMMONSENSE_AVG].fillna(df[metrics].mean(axis=1, skipna=False))
    return df


def _limit_layout(merged: pd.DataFrame) -> tuple[list[tuple[str, str]], tuple[str, ...], str]:
    """Accuracy rows are kept apart per lm-eval `limit` (docs per task): a 1-doc pipeline
    check never merges into a 200-doc measurement. One limit: named in the caption; several:
    a "Docs/task" column, and Δ compares with the fp16 row at the same limit."""
    labels = [("model", "Model"), ("method_label", "Method"), ("bits", "Bits")]
    limits = sorted(set(merged["docs_per_task"].astype(str))) if not merged.empty else []
    if len(limits) > 1:
        return [*labels, ("docs_per_task", "Docs/task")], ("model", "docs_per_task"), ""
    note = f" First {limits[0]} docs per task." if limits and limits[0] != "all" else ""
    return labels, ("model",), note


def _with_limit(df: pd.DataFrame) -> pd.DataFrame:
    if "docs_per_task" not in df.columns:
        df = df.assign(docs_per_task="all")
    return df.assign(docs_per_task=df["docs_per_task"].fillna("all").astype(str))


def accuracy_table(df: pd.DataFrame, prefer_norm: bool = False) -> Table:
    """Zero-shot accuracy: rows method x bits (x docs per task); columns tasks + average (%)."""
    norm = {metric_info(m).subject: m for m in table_metrics(df, "accuracy_norm")}
    cols = [metric_column(norm.get(metric_info(m).subject, m) if prefer_norm else m)
            for m in accuracy_metrics(df)]
    if not cols:
        return Table("accuracy", "Zero-shot accuracy (%)", [], [], 0)
    df = _with_limit(with_commonsense_avg(df, [c.metric for c in cols]))
    cols.append(metric_column(COMMONSENSE_AVG))
    merged = merge_rows(rows_for(df, "lm_eval", [c.metric for c in cols], tasks=COMMONSENSE_TASKS),
                        (*ROW_KEYS, "docs_per_task"), [c.metric for c in cols])
    labels, groups, note = _limit_layout(merged)
    return build_table(merged, "accuracy", "Zero-shot accuracy (%, higher is better)",
                       labels, cols, group_cols=groups,
                       caption="lm-eval zero-shot accuracy; ± is the lm-eval standard error."
                       + note)


def mmlu_table(df: pd.DataFrame) -> Table:
    cols = [metric_column(m) for m in table_metrics(df, "mmlu")]
    if not cols:
        return Table("mmlu", "MMLU (%)", [], [], 0)
    merged = merge_rows(rows_for(_with_limit(df), "lm_eval", [c.metric for c in cols],
                                 tasks=("mmlu",)),
                        (*ROW_KEYS, "docs_per_task"), [c.metric for c in cols])
    labels, groups, note = _limit_layout(merged)
    return build_table(merged, "mmlu", "MMLU accuracy by category (%, higher is better)",
                       labels, cols, group_cols=groups, caption=note.strip())


def latency_long(df: pd.DataFrame) -> tuple[pd.DataFrame, list[Column]]:
    """Latency metrics -> one row per record x batch; one column per kind (x prompt len),
    as the latency evaluator describes each metric (MetricInfo.batch / subject)."""
    metrics = table_metrics(df, "latency")
    rows = []
    for _, r in df.iterrows():
        per_batch: dict[int, dict[str, float]] = {}
        for m in metrics:
            info = metric_info(m)
            if is_num(r[m]):
                per_batch.setdefault(info.batch, {})[info.subject] = r[m]
        batches = per_batch or ({0: {}} if r["status"] != "ok" else {})
        for b, vals in batches.items():
            rows.append({**r.to_dict(), "batch": b if b else "-", **vals})
    cols = {}
    for m in metrics:           # already in column order
        info = metric_info(m)
        cols.setdefault(info.subject, Column(info.label, info.subject,
                                             lower_is_better=not info.higher_is_better,
                                             digits=info.digits))
    return pd.DataFrame(rows), list(cols.values())


def latency_table(df: pd.DataFrame) -> Table:
    """Rows method x bits x batch; prefill / TTFT (ms), decode (tok/s), peak memory (MB)."""
    keep = rows_for(df, "latency", table_metrics(df, "latency"))
    if keep.empty:
        return Table("latency", "Latency and memory", [], [], 0)
    long, cols = latency_long(keep)
    if not cols:
        return Table("latency", "Latency and memory", [], [], 0)
    merged = merge_rows(long, (*ROW_KEYS, "batch"), [c.metric for c in cols])
    return build_table(merged, "latency", "Latency and memory by batch size",
                       [("model", "Model"), ("method_label", "Method"), ("bits", "Bits"),
                        ("batch", "Batch")], cols, group_cols=("model", "batch"))


COST_COLUMNS = (Column("calib data (s)", "time_calibration_data", delta=False),
                Column("quantize (s)", "time_quantize", delta=False),
                Column("peak quantize mem (MB)", "mem_peak_quantize_mb", digits=0, delta=False))


def cost_table(df: pd.DataFrame) -> Table:
    """Quantization cost: time of each phase and peak memory (Δ vs fp16 is meaningless:
    fp16 does no quantization)."""
    cols = [c for c in COST_COLUMNS if c.metric in df.columns]
    if not cols or df.empty:
        return Table("cost", "Quantization cost", [], [], 0)
    merged = merge_rows(df, ROW_KEYS, [c.metric for c in cols], ignore=("eval.",))
    merged = merged[merged["method"] != BASELINE_METHOD]
    return build_table(merged, "cost", "Quantization cost (lower is better)",
                       [("model", "Model"), ("method_label", "Method"), ("bits", "Bits")], cols,
                       delta=False)


def fptq_policy_table(df: pd.DataFrame) -> Table:
    """How many linears took which FPTQ activation path, per model x bits."""
    if "fptq_policy" not in df.columns:
        return Table("fptq_policy", "FPTQ layer-wise policy", [], [], 0)
    recs = with_method_label(latest_per_config(df))
    recs = recs[recs["fptq_policy"].map(lambda p: isinstance(p, list) and bool(p)).astype(bool)]
    counts: dict[tuple[str, str, str], dict[str, int]] = {}
    for _, r in recs.sort_values("finished_at").iterrows():
        c: dict[str, int] = {}
        for row in r["fptq_policy"]:
            c[str(row.get("strategy"))] = c.get(str(row.get("strategy")), 0) + 1
        counts[(r["model"], r["method_label"], r["bits"])] = c
    if not counts:
        return Table("fptq_policy", "FPTQ layer-wise policy", [], [], 0)
    strategies = sorted({s for c in counts.values() for s in c})
    header = ["Model", "Method", "Bits", *strategies, "total"]
    rows = [[Cell(m), Cell(meth), Cell(b),
             *[Cell(str(c.get(s, 0)), c.get(s, 0)) for s in strategies],
             Cell(str(sum(c.values())), sum(c.values()))]
            for (m, meth, b), c in sorted(counts.items())]
    return Table("fptq_policy", "FPTQ layer-wise activation policy (linears per strategy)",
                 header, rows, 3)


def exports_table(df: pd.DataFrame) -> Table:
    """Serving checkpoints written by runs (export=...): format, size, stated deviations,
    or why the export could not be made."""
    if "export" not in df.columns:
        return Table("exports", "Exports", [], [], 0)
    recs = with_method_label(latest_per_config(df))
    recs = recs[recs["export"].map(lambda e: isinstance(e, dict) and bool(e)).astype(bool)]
    header = ["Model", "Method", "Bits", "Format", "Size (MB)", "Deviations", "Path or error"]
    rows = []
    for _, r in recs.sort_values(["model", "method_label", "bits"]).iterrows():
        e = r["export"]
        size = e.get("size_bytes")
        fmt_name = "/".join(filter(None, [str(e.get("format")), e.get("ct_format")]))
        if (e.get("transforms") or {}).get("groups"):
            fmt_name += f" + {e['transforms']['groups']} online transforms"
        devs = "; ".join(f"{d} ({len(v)} linears)" if v else d
                         for d, v in (e.get("deviations") or {}).items())
        rows.append([Cell(str(r["model"])), Cell(str(r["method_label"])), Cell(str(r["bits"])),
                     Cell(fmt_name),
                     Cell("-" if size is None else fmt(size / 2 ** 20, 2), size),
                     Cell(devs or "none"), Cell(str(e.get("error") or e.get("path")))])
    return Table("exports", "Serving exports (export=compressed_tensors | gptq)", header,
                 rows, 3)


def superseded_table(df: pd.DataFrame) -> Table:
    old = superseded(df)
    if old.empty:
        return Table("superseded", "Superseded runs", [], [], 0)
    header = ["Run id", "Model", "Method", "Bits", "Eval", "Status", "Finished", "Superseded by"]
    rows = [[Cell(str(r["run_id"])), Cell(str(r["model"])),
             Cell(method_label(r["method"], r.get("variant"))),
             Cell(str(r["bits"])), Cell(str(r["eval"])), Cell(str(r["status"])),
             Cell(str(r["finished_at"])), Cell(str(r["superseded_by"]))]
            for _, r in old.iterrows()]
    return Table("superseded", "Superseded runs (a newer record with the same config hash wins)",
                 header, rows, 1)


# ---------------------------------------------------------------------------------------
# published references
