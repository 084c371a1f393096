"""The tables quantization papers print: perplexity (long and wide), zero-shot accuracy,
MMLU, latency and memory, quantization cost, FPTQ's layer policy and superseded runs."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from harness.results.records import (
    BASELINE_METHOD,
    ROW_KEYS,
    bits_key,
    latest_per_config,
    method_key,
    method_label,
    superseded,
    with_method_label,
)
from harness.results.tables import (
    Cell,
    Column,
    Notes,
    Table,
    build_table,
    is_num,
    merge_rows,
    rows_for,
    status_cell,
)

DATASET_LABELS = {"wikitext2": "WikiText-2", "c4": "C4", "ptb": "PTB"}
MMLU_CATEGORIES = (("mmlu_stem", "STEM"), ("mmlu_humanities", "Humanities"),
                   ("mmlu_social_sciences", "Social Sci."), ("mmlu_other", "Other"),
                   ("mmlu_avg", "Avg."))
ACC_SCALE = 100.0   # lm-eval reports fractions; papers print percent
_LATENCY_RE = re.compile(
    r"^(?P<kind>latency_prefill_ms|decode_tok_s|ttft_ms|peak_mem_mb)_b(?P<batch>\d+)(?P<rest>.*)$")
LATENCY_KINDS = {  # metric kind -> (column label, unit, lower is better)
    "latency_prefill_ms": ("prefill", "ms", True),
    "ttft_ms": ("TTFT", "ms", True),
    "decode_tok_s": ("decode", "tok/s", False),
    "peak_mem_mb": ("peak mem", "MB", True),
}



def ppl_datasets(df: pd.DataFrame) -> list[str]:
    """Datasets with a GPTQ-protocol perplexity: ppl_* columns filled by records of the
    `ppl` evaluator (lm-eval's word perplexity of LAMBADA is an accuracy-suite metric)."""
    if "evaluators" in df.columns:
        ran = df["evaluators"].map(lambda e: not isinstance(e, tuple) or not e or "ppl" in e)
        df = df[ran]
    found = [c[4:] for c in df.columns if c.startswith("ppl_") and not c.endswith("_stderr")
             and df[c].notna().any()]
    order = list(DATASET_LABELS)
    return sorted(found, key=lambda d: (order.index(d) if d in order else len(order), d))


def perplexity_table(df: pd.DataFrame) -> Table:
    """Rows model x method x bits; one column per dataset (WikiText-2, C4, PTB) plus Δ."""
    sets = ppl_datasets(df)
    cols = [Column(DATASET_LABELS.get(d, d), f"ppl_{d}") for d in sets]
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
    sets = ppl_datasets(df)
    metrics = [f"ppl_{d}" for d in sets]
    sub = rows_for(df, "ppl", metrics)
    sub = sub.assign(method=with_method_label(sub)["method_label"], variant="")
    if _several_calibrations(sub):      # one column group per calibration setting
        sub = sub.assign(method=[m if m == BASELINE_METHOD or not isinstance(c, str)
                                 else f"{m} @{c}" for m, c in zip(sub["method"], sub["calib"],
                                                                  strict=True)])
    merged = merge_rows(sub, ("model", "method", "bits"), metrics)
    if merged.empty:
        return Table("perplexity_wide", "Perplexity by method and bits", [], [], 0)
    combos = sorted({(r.method, r.bits) for r in merged.itertuples()},
                    key=lambda mb: (method_key(mb[0]), bits_key(mb[1])))
    wide = []
    for model, grp in merged.groupby("model", sort=True):
        row = {"model": model, "method": "-", "bits": "-", "status": "ok", "error": None,
               "has_failure": False}
        for _, r in grp.iterrows():
            for d in sets:
                key = f"{r['method']}|{r['bits']}|{d}"
                row[key] = r.get(f"ppl_{d}")
                row[f"{key}_stderr"] = r.get(f"ppl_{d}_stderr")
                if not is_num(row[key]) and (r["status"] != "ok" or r["has_failure"]):
                    row[f"{key}_status"] = (r["status"] if r["status"] != "ok" else "failed",
                                            r["error"])
        wide.append(row)
    wide_df = pd.DataFrame(wide)
    cols = [Column(f"{m} {b} {DATASET_LABELS.get(d, d)}", f"{m}|{b}|{d}", delta=False)
            for m, b in combos for d in sets]
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
        for d in sets:
            idx = [j for j, c in enumerate(cols, start=1)
                   if c.metric.endswith(f"|{d}") and not c.metric.startswith(f"{BASELINE_METHOD}|")]
            vals = [row[j].value for j in idx if row[j].value is not None]
            for j in idx:
                if vals and row[j].value == min(vals):
                    row[j].bold = True
    table.footnotes = ([f"[{i}] {t}" for i, t in enumerate(notes.items, 1)]
                       + [f for f in table.footnotes if not f.startswith("[")])
    return table


def accuracy_tasks(df: pd.DataFrame) -> list[str]:
    return sorted({c[4:] for c in df.columns if c.startswith("acc_")
                   and not c.startswith("acc_norm_") and not c.endswith("_stderr")
                   and c != "acc_commonsense_avg" and not c.startswith("acc_mmlu")})


def with_commonsense_avg(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """`acc_commonsense_avg` as recorded, else the mean over the task columns (NaN if any task
    is missing: an average over fewer tasks is not comparable)."""
    metrics = list(metrics) if metrics is not None else [f"acc_{t}" for t in accuracy_tasks(df)]
    df = df.copy()
    if "acc_commonsense_avg" not in df.columns:
        df["acc_commonsense_avg"] = float("nan")
    if metrics:
        df["acc_commonsense_avg"] = df["acc_commonsense_avg"].fillna(
            df[metrics].mean(axis=1, skipna=False))
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
    tasks = accuracy_tasks(df)
    def metric(t: str) -> str:
        return f"acc_norm_{t}" if prefer_norm and f"acc_norm_{t}" in df.columns else f"acc_{t}"
    cols = [Column(t, metric(t), lower_is_better=False, scale=ACC_SCALE) for t in tasks]
    if not cols:
        return Table("accuracy", "Zero-shot accuracy (%)", [], [], 0)
    df = _with_limit(with_commonsense_avg(df, [c.metric for c in cols]))
    cols.append(Column("Avg.", "acc_commonsense_avg", lower_is_better=False, scale=ACC_SCALE))
    merged = merge_rows(rows_for(df, "lm_eval", [c.metric for c in cols]),
                        (*ROW_KEYS, "docs_per_task"), [c.metric for c in cols])
    labels, groups, note = _limit_layout(merged)
    return build_table(merged, "accuracy", "Zero-shot accuracy (%, higher is better)",
                       labels, cols, group_cols=groups,
                       caption="lm-eval zero-shot accuracy; ± is the lm-eval standard error."
                       + note)


def mmlu_table(df: pd.DataFrame) -> Table:
    cols = [Column(lbl, m, lower_is_better=False, scale=ACC_SCALE)
            for m, lbl in MMLU_CATEGORIES if m in df.columns]
    if not cols:
        return Table("mmlu", "MMLU (%)", [], [], 0)
    merged = merge_rows(rows_for(_with_limit(df), "lm_eval", [c.metric for c in cols]),
                        (*ROW_KEYS, "docs_per_task"), [c.metric for c in cols])
    labels, groups, note = _limit_layout(merged)
    return build_table(merged, "mmlu", "MMLU accuracy by category (%, higher is better)",
                       labels, cols, group_cols=groups, caption=note.strip())


def latency_long(df: pd.DataFrame) -> tuple[pd.DataFrame, list[Column]]:
    """Wide latency metrics -> one row per record x batch; columns per kind (x prompt len)."""
    found: dict[str, tuple[str, str, bool]] = {}
    rows = []
    for _, r in df.iterrows():
        per_batch: dict[int, dict[str, float]] = {}
        for col in df.columns:
            m = _LATENCY_RE.match(col)
            if not m or col.endswith("_stderr"):
                continue
            label, unit, low = LATENCY_KINDS[m["kind"]]
            rest = m["rest"].strip("_")
            key = f"{m['kind']}{'_' + rest if rest else ''}"
            found[key] = (f"{label}{' ' + rest if rest else ''} ({unit})", m["kind"], low)
            if is_num(r[col]):
                per_batch.setdefault(int(m["batch"]), {})[key] = r[col]
        batches = per_batch or ({0: {}} if r["status"] != "ok" else {})
        for b, vals in batches.items():
            rows.append({**r.to_dict(), "batch": b if b else "-", **vals})
    order = list(LATENCY_KINDS)
    cols = [Column(lbl, key, lower_is_better=low, digits=2 if kind != "peak_mem_mb" else 0)
            for key, (lbl, kind, low) in sorted(found.items(),
                                                 key=lambda kv: (order.index(kv[1][1]), kv[0]))]
    return pd.DataFrame(rows), cols


def latency_table(df: pd.DataFrame) -> Table:
    """Rows method x bits x batch; prefill / TTFT (ms), decode (tok/s), peak memory (MB)."""
    keep = rows_for(df, "latency", [c for c in df.columns if _LATENCY_RE.match(c)])
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
    merged = merge_rows(df, ROW_KEYS, [c.metric for c in cols])
    merged = merged[merged["method"] != BASELINE_METHOD]
    return build_table(merged, "cost", "Quantization cost (lower is better)",
                       [("model", "Model"), ("method_label", "Method"), ("bits", "Bits")], cols,
                       delta=False)


def fptq_policy_table(df: pd.DataFrame) -> Table:
    """How many linears took which FPTQ activation path, per model x bits."""
    if "fptq_policy" not in df.columns:
        return Table("fptq_policy", "FPTQ layer-wise policy", [], [], 0)
    recs = with_method_label(latest_per_config(df))
    recs = recs[recs["fptq_policy"].map(lambda p: isinstance(p, list) and bool(p))]
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
