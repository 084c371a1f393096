"""Pure functions: store DataFrame -> tables in the layouts quantization papers use.

Every table is a `Table` of `Cell`s (value, stderr, status text, bold flag), built from the
latest record per config hash, and rendered to markdown, LaTeX (booktabs) or CSV. Cells are
never blank: a failed or skipped run reads "failed" / "skipped<sup>n</sup>" (the reason in a
footnote), a metric an ok run did not measure reads "–" (footnoted).

Row merging: several records can feed one table row (e.g. eval=ppl and eval=lm_eval runs of
the same model x method x bits); per metric the newest ok record that has it wins.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

ID_COLS = ("model", "method", "bits", "eval")
BASELINE_METHOD = "fp16"
DATASET_LABELS = {"wikitext2": "WikiText-2", "c4": "C4", "ptb": "PTB"}
MMLU_CATEGORIES = (("mmlu_stem", "STEM"), ("mmlu_humanities", "Humanities"),
                   ("mmlu_social_sciences", "Social Sci."), ("mmlu_other", "Other"),
                   ("mmlu_avg", "Avg."))
ACC_SCALE = 100.0   # lm-eval reports fractions; papers print percent
NOT_MEASURED = "–"
# A bits label like w4a8 -> (4, 8); papers order columns from wide to narrow.
_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")
_LATENCY_RE = re.compile(
    r"^(?P<kind>latency_prefill_ms|decode_tok_s|ttft_ms|peak_mem_mb)_b(?P<batch>\d+)(?P<rest>.*)$")
LATENCY_KINDS = {  # metric kind -> (column label, unit, lower is better)
    "latency_prefill_ms": ("prefill", "ms", True),
    "ttft_ms": ("TTFT", "ms", True),
    "decode_tok_s": ("decode", "tok/s", False),
    "peak_mem_mb": ("peak mem", "MB", True),
}


def bits_key(bits: str) -> tuple[int, int, str]:
    m = _BITS_RE.match(str(bits))
    return (-int(m.group(1)), -int(m.group(2)), "") if m else (0, 0, str(bits))


def method_key(method: str) -> tuple[int, str]:
    return (0 if method == BASELINE_METHOD else 1, str(method))


# ---------------------------------------------------------------------------------------
# record selection
# ---------------------------------------------------------------------------------------


def latest_per_config(df: pd.DataFrame) -> pd.DataFrame:
    """The newest record per config hash (older ones stay in the store)."""
    if df.empty:
        return df
    return df.sort_values("finished_at", kind="stable").groupby("config_hash").tail(1)


def superseded(df: pd.DataFrame) -> pd.DataFrame:
    """Records a newer record with the same config hash replaces, with the replacing run id."""
    if df.empty:
        return df
    df = df.sort_values("finished_at", kind="stable")
    latest = df.groupby("config_hash")["run_id"].transform("last")
    old = df[df["run_id"] != latest].copy()
    old["superseded_by"] = latest[old.index]
    return old


def filter_runs(df: pd.DataFrame, model: Sequence[str] | None = None,
                method: Sequence[str] | None = None, bits: Sequence[str] | None = None,
                eval: Sequence[str] | None = None, sweep: Sequence[str] | None = None,
                since: str | pd.Timestamp | None = None,
                until: str | pd.Timestamp | None = None) -> pd.DataFrame:
    """Keep records matching every given filter; since/until bound finished_at (UTC)."""
    if df.empty:
        return df
    for col, keep in (("model", model), ("method", method), ("bits", bits), ("eval", eval),
                      ("sweep", sweep)):
        if keep:
            values = df[col].astype(str)
            if col == "method":   # "fptq" also selects its variants, e.g. "fptq (policy=...)"
                values = values.str.split(" (", n=1, regex=False).str[0]
            df = df[values.isin(list(keep)) | df[col].isin(list(keep))]
    for bound, op in ((since, "ge"), (until, "le")):
        if bound is not None:
            ts = pd.Timestamp(bound)
            ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
            df = df[getattr(df["finished_at"], op)(ts)]
    return df


def records_frame(store) -> pd.DataFrame:
    """`store.load()` plus the config fields tables match on: evaluators, group size, eval
    seqlen and window cap, calibration, and the FPTQ policy rows from the artifacts."""
    df = store.load()
    if df.empty:
        return df
    extra = {}
    for r in store.records():
        cfg = r.get("config") or {}
        ev, meth, calib = cfg.get("eval") or {}, cfg.get("method") or {}, cfg.get("calib") or {}
        gs = meth.get("group_size", (cfg.get("bits") or {}).get("group_size"))
        extra[r["run_id"]] = {
            "evaluators": tuple(ev.get("evaluators") or ()),
            "group_size": None if gs in (None, -1, 0) else int(gs),
            "seqlen": ev.get("seqlen"),
            "max_windows": ev.get("max_windows"),
            "docs_per_task": "all" if ev.get("limit") in (None, 0) else str(ev.get("limit")),
            "calib": calib_label(calib),
            "method_cfg": meth,
            "fptq_policy": policy_rows((r.get("artifacts") or {}).get("fptq_policy")),
        }
    cols = pd.DataFrame.from_dict(extra, orient="index")
    df = df.join(cols, on="run_id")
    df["method"] = [f"{m} ({v})" if v else m
                    for m, v in zip(df["method"], method_variants(df), strict=True)]
    return df


def calib_label(calib: dict) -> str | None:
    """"c4-128x2048"; a seed other than the default 0 is appended ("c4-32x512-seed1") so
    runs on different calibration draws are never paired or merged as the same setting."""
    if not calib:
        return None
    label = f"{calib.get('dataset')}-{calib.get('n_samples')}x{calib.get('seqlen')}"
    seed = calib.get("seed", 0)
    return label if seed in (0, None) else f"{label}-seed{seed}"


def policy_rows(policy: Any) -> list[dict] | None:
    """FPTQ's policy artifact: {"rows": [...], "counts": ...} (or a bare row list)."""
    if isinstance(policy, dict):
        policy = policy.get("rows")
    return policy if isinstance(policy, list) else None


_BITS_KEYS = {"w_bits", "a_bits", "group_size", "name", "_target_"}


def _numeric(v: Any) -> Any:
    """15 and 15.0 are the same setting (CLI overrides give ints, YAML floats)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _config_fields(target: Any) -> dict[str, Any] | None:
    # imported here: methods.base pulls in torch, which tables of plain records never need
    from methods.base import config_field_defaults
    return config_field_defaults(target) if target else None


def _with_defaults(cfg: dict) -> dict:
    """A record made before an option existed ran with its default: fill the missing
    fields from the config dataclass named by `_target_` (when it still imports)."""
    fields = _config_fields(cfg.get("_target_"))
    if not fields:
        return cfg
    return {**{k: v for k, v in fields.items() if v is not dataclasses.MISSING}, **cfg}


def _default_of(target: Any, key: str) -> str | None:
    """json text of the dataclass default of `key` for the config class `target`."""
    default = (_config_fields(target) or {}).get(key, dataclasses.MISSING)
    return (None if default is dataclasses.MISSING
            else json.dumps(_numeric(default), sort_keys=True, default=str))


def method_variants(df: pd.DataFrame) -> list[str]:
    """Per row, the method hyper-parameters that differ from the most common value among the
    records of the same method (e.g. "act_mode=dynamic_token"), so ablation runs of one
    method get distinct labels; "" for the common setting. A record without the key (made
    before the option existed) counts with the config class's default, or, when that class
    no longer imports, is not labelled by it."""
    out = [""] * len(df)
    cfgs = [_with_defaults(c) if isinstance(c, dict) else {} for c in df["method_cfg"]]
    for method in set(df["method"]):
        idx = [i for i, m in enumerate(df["method"]) if m == method]
        keys = sorted({k for i in idx for k in cfgs[i]} - _BITS_KEYS)
        for k in keys:
            have = [i for i in idx if k in cfgs[i]]
            vals = [json.dumps(_numeric(cfgs[i][k]), sort_keys=True, default=str)
                    for i in have]
            if len(set(vals)) < 2:
                continue
            default = _default_of(cfgs[have[0]].get("_target_"), k)
            # most common value; on a tie the config class's default stays unlabelled
            common = max(sorted(set(vals)), key=lambda v: (vals.count(v), v == default))
            for i, v in zip(have, vals, strict=True):
                if v != common:
                    out[i] = ", ".join(filter(None, [out[i], f"{k}={json.loads(v)}"]))
    return out


# ---------------------------------------------------------------------------------------
# table model
# ---------------------------------------------------------------------------------------


@dataclass
class Cell:
    text: str
    value: float | None = None
    stderr: float | None = None
    bold: bool = False


@dataclass
class Table:
    name: str                       # file stem: tables/<name>.csv
    title: str
    columns: list[str]              # header labels, row-label columns first
    rows: list[list[Cell]]
    n_label_cols: int
    footnotes: list[str] = field(default_factory=list)
    caption: str = ""

    @property
    def empty(self) -> bool:
        return not self.rows


@dataclass(frozen=True)
class Column:
    label: str
    metric: str                     # column name in the wide frame
    lower_is_better: bool = True
    scale: float = 1.0
    digits: int = 2
    delta: bool = True              # add a Δ-vs-fp16 column after this one


class _Notes:
    """Numbered footnotes for skipped reasons (deduplicated, in order of first use)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def mark(self, text: str) -> int:
        if text not in self.items:
            self.items.append(text)
        return self.items.index(text) + 1


def short_reason(error: Any, limit: int = 120) -> str:
    text = " ".join(str(error or "no reason recorded").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _status_cell(status: str, error: Any, notes: _Notes) -> Cell:
    if status == "skipped":
        n = notes.mark(f"skipped: {short_reason(error)}")
        return Cell(f"skipped[{n}]")
    if status == "failed":
        n = notes.mark(f"failed: {short_reason(error)}")
        return Cell(f"failed[{n}]")
    return Cell(NOT_MEASURED)


def _fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def merge_rows(df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per `keys` combination: per metric the newest ok value (with its stderr);
    `status`/`error` from the newest non-ok record when no ok record exists for the row."""
    df = latest_per_config(df).sort_values("finished_at", kind="stable")
    out = []
    for key, grp in df.groupby(list(keys), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        ok = grp[grp["status"] == "ok"]
        bad = grp[grp["status"] != "ok"]
        for m in metrics:
            for _, rec in ok.iloc[::-1].iterrows():
                if m in rec and _is_num(rec[m]):
                    row[m] = float(rec[m])
                    se = rec.get(f"{m}_stderr")
                    row[f"{m}_stderr"] = float(se) if _is_num(se) else None
                    break
        row["status"] = "ok" if not ok.empty else bad.iloc[-1]["status"]
        row["error"] = bad.iloc[-1]["error"] if not bad.empty else None
        row["has_failure"] = not bad.empty
        out.append(row)
    return pd.DataFrame(out)


def _count_key(v: Any) -> tuple[int, int]:
    """"5" < "200" < "all" (docs per task)."""
    return (0, int(v)) if str(v).isdigit() else (1, 0)


def build_table(merged: pd.DataFrame, name: str, title: str, label_cols: Sequence[tuple[str, str]],
                columns: Sequence[Column], group_cols: Sequence[str] = ("model",),
                delta: bool = True, baseline: Callable[[pd.Series], bool] | None = None,
                caption: str = "") -> Table:
    """Rows of `merged` -> Table. Δ vs the fp16 row of the same group; best (excluding the
    baseline) per column and group in bold."""
    notes = _Notes()
    baseline = baseline or (lambda r: r["method"] == BASELINE_METHOD)
    if merged.empty:
        return Table(name, title, [], [], 0, caption=caption)
    merged = merged.sort_values(
        [*group_cols, "method", "bits"],
        key=lambda s: s.map(method_key) if s.name == "method"
        else s.map(bits_key) if s.name == "bits"
        else s.map(_count_key) if s.name == "docs_per_task"
        else s.astype(str)).reset_index(drop=True)
    group_of = [tuple(r[g] for g in group_cols) for _, r in merged.iterrows()]
    base_rows = {g: r for g, (_, r) in zip(group_of, merged.iterrows(), strict=True)
                 if baseline(r) and r["status"] == "ok"}
    best: dict[tuple, float] = {}
    for g, (_, r) in zip(group_of, merged.iterrows(), strict=True):
        if baseline(r):
            continue
        for c in columns:
            v = r.get(c.metric)
            if _is_num(v):
                k = (g, c.metric)
                better = min if c.lower_is_better else max
                best[k] = v if k not in best else better(best[k], v)
    header = [lbl for _, lbl in label_cols]
    for c in columns:
        header.append(c.label)
        if delta and c.delta:
            header.append(f"Δ {c.label}")
    rows = []
    for g, (_, r) in zip(group_of, merged.iterrows(), strict=True):
        cells = [Cell(str(r[col])) for col, _ in label_cols]
        base = base_rows.get(g)
        for c in columns:
            v = r.get(c.metric)
            if _is_num(v):
                se = r.get(f"{c.metric}_stderr")
                text = _fmt(v * c.scale, c.digits)
                if _is_num(se):
                    text += f" ± {_fmt(se * c.scale, c.digits)}"
                cell = Cell(text, v * c.scale, se * c.scale if _is_num(se) else None,
                            bold=not baseline(r) and best.get((g, c.metric)) == v)
            elif r["status"] != "ok" or r.get("has_failure"):
                cell = _status_cell(r["status"] if r["status"] != "ok" else "failed",
                                    r.get("error"), notes)
            else:
                cell = Cell(NOT_MEASURED)
            cells.append(cell)
            if delta and c.delta:
                bv = None if base is None else base.get(c.metric)
                if baseline(r) and r["status"] == "ok":
                    cells.append(Cell("ref"))
                elif baseline(r):       # a skipped/failed fp16 job is no reference
                    cells.append(Cell(NOT_MEASURED))
                elif _is_num(v) and _is_num(bv):
                    d = (v - bv) * c.scale
                    cells.append(Cell(f"{d:+.{c.digits}f}", d))
                else:
                    cells.append(Cell(NOT_MEASURED))
        rows.append(cells)
    footnotes = [f"[{i}] {t}" for i, t in enumerate(notes.items, 1)]
    used = {c.text for row in rows for c in row}
    if NOT_MEASURED in used:
        footnotes.append(f"{NOT_MEASURED}: not measured (no run produced it"
                         + (", or no fp16 baseline for Δ)" if delta else ")"))
    return Table(name, title, header, rows, len(label_cols), footnotes, caption)


def _rows_for(df: pd.DataFrame, evaluator: str, metric_cols: Iterable[str]) -> pd.DataFrame:
    """Records relevant to a table: ok ones carrying any of its metrics, and failed/skipped
    ones whose eval config ran `evaluator` (unknown evaluators: kept)."""
    metric_cols = [c for c in metric_cols if c in df.columns]
    has = df[metric_cols].notna().any(axis=1) if metric_cols else pd.Series(False, df.index)
    if "evaluators" in df.columns:
        ran = df["evaluators"].map(lambda e: not isinstance(e, tuple) or not e or evaluator in e)
    else:
        ran = pd.Series(True, df.index)
    return df[(has & (df["status"] == "ok")) | ((df["status"] != "ok") & ran)]


# ---------------------------------------------------------------------------------------
# paper tables
# ---------------------------------------------------------------------------------------


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
    rows = _rows_for(df, "ppl", [c.metric for c in cols])
    labels = [("model", "Model"), ("method", "Method"), ("bits", "Bits")]
    keys: tuple[str, ...] = ("model", "method", "bits")
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
    sub = _rows_for(df, "ppl", metrics)
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
                if not _is_num(row[key]) and (r["status"] != "ok" or r["has_failure"]):
                    row[f"{key}_status"] = (r["status"] if r["status"] != "ok" else "failed",
                                            r["error"])
        wide.append(row)
    wide_df = pd.DataFrame(wide)
    cols = [Column(f"{m} {b} {DATASET_LABELS.get(d, d)}", f"{m}|{b}|{d}", delta=False)
            for m, b in combos for d in sets]
    table = build_table(wide_df, "perplexity_wide", "Perplexity by method and bits",
                        [("model", "Model")], cols, delta=False, baseline=lambda r: False)
    # Missing cells of failed/skipped combos name their status (the row itself is ok).
    notes = _Notes()
    notes.items = [f.split("] ", 1)[1] for f in table.footnotes if f.startswith("[")]
    for row, (_, r) in zip(table.rows, wide_df.iterrows(), strict=True):
        for j, c in enumerate(cols, start=1):
            st = r.get(f"{c.metric}_status")
            if isinstance(st, tuple) and row[j].value is None:
                row[j] = _status_cell(st[0], st[1], notes)
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
    labels = [("model", "Model"), ("method", "Method"), ("bits", "Bits")]
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
    merged = merge_rows(_rows_for(df, "lm_eval", [c.metric for c in cols]),
                        ("model", "method", "bits", "docs_per_task"), [c.metric for c in cols])
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
    merged = merge_rows(_rows_for(_with_limit(df), "lm_eval", [c.metric for c in cols]),
                        ("model", "method", "bits", "docs_per_task"), [c.metric for c in cols])
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
            if _is_num(r[col]):
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
    keep = _rows_for(df, "latency", [c for c in df.columns if _LATENCY_RE.match(c)])
    if keep.empty:
        return Table("latency", "Latency and memory", [], [], 0)
    long, cols = latency_long(keep)
    if not cols:
        return Table("latency", "Latency and memory", [], [], 0)
    merged = merge_rows(long, ("model", "method", "bits", "batch"), [c.metric for c in cols])
    return build_table(merged, "latency", "Latency and memory by batch size",
                       [("model", "Model"), ("method", "Method"), ("bits", "Bits"),
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
    merged = merge_rows(df, ("model", "method", "bits"), [c.metric for c in cols])
    merged = merged[merged["method"] != BASELINE_METHOD]
    return build_table(merged, "cost", "Quantization cost (lower is better)",
                       [("model", "Model"), ("method", "Method"), ("bits", "Bits")], cols,
                       delta=False)


def fptq_policy_table(df: pd.DataFrame) -> Table:
    """How many linears took which FPTQ activation path, per model x bits."""
    if "fptq_policy" not in df.columns:
        return Table("fptq_policy", "FPTQ layer-wise policy", [], [], 0)
    recs = latest_per_config(df)
    recs = recs[recs["fptq_policy"].map(lambda p: isinstance(p, list) and bool(p))]
    counts: dict[tuple[str, str, str], dict[str, int]] = {}
    for _, r in recs.sort_values("finished_at").iterrows():
        c: dict[str, int] = {}
        for row in r["fptq_policy"]:
            c[str(row.get("strategy"))] = c.get(str(row.get("strategy")), 0) + 1
        counts[(r["model"], r["method"], r["bits"])] = c
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


# Reference-library baseline -> the native methods it is compared with (conf/method/llmc_*).
LIBRARY_NATIVE = {"llmc_gptq": ("gptq",), "gptqmodel_gptq": ("gptq",), "llmc_awq": ("awq_noclip", "awq"),
                  "llmc_smoothquant": ("smoothquant",)}
# Settings a native run must share with the library run to be its like-for-like partner
# (besides model, bits, calibration and the perplexity windows).
_ALIGN_KEYS = ("group_size", "symmetric", "act_mode", "alpha")


def _base_method(label: str) -> str:
    return str(label).split(" (", 1)[0]


def _key_text(v: Any) -> str:
    """Comparable text of a config value (None and NaN alike: pandas turns one into the other)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(_numeric(v))


def _align_settings(r: pd.Series) -> tuple:
    cfg = r["method_cfg"] if isinstance(r.get("method_cfg"), dict) else {}
    quant_acts = int(cfg.get("a_bits", 16) or 16) < 16
    return tuple(_numeric(cfg.get(k)) if k != "act_mode" or quant_acts else None
                 for k in _ALIGN_KEYS)


_NOT_SETTINGS = {"name", "_target_", "keep_fp", "keep_w8", "keep_top_k_sensitive",
                 "sensitivity_from", "sensitivity_groups"}


def _shared_settings_agree(nat: pd.Series, lib: pd.Series) -> bool:
    """Hyper-parameters both configs define (e.g. true_sequential for gptq and
    gptqmodel_gptq, damp for every GPTQ) must be equal; a setting only one side has (the
    native default true_sequential vs llm-compressor, which has none) does not block. A
    record made before a setting existed counts with its config class's default (AWQ's
    ratio_grid: native half_open, llm-compressor's fixed closed grid)."""
    a, b = (_with_defaults(r["method_cfg"]) if isinstance(r.get("method_cfg"), dict) else {}
            for r in (nat, lib))
    return all(_key_text(_numeric(a[k])) == _key_text(_numeric(b[k]))
               for k in (set(a) & set(b)) - _NOT_SETTINGS - set(_ALIGN_KEYS))


def alignment_table(df: pd.DataFrame) -> Table:
    """Native method vs its reference-library run on the same model, bits, calibration,
    windows and grid settings: perplexity of each and the relative difference
    (native / library - 1, in %; the issue's target is |Δ| <= 1%)."""
    need = {"method_cfg", "calib", "seqlen", "max_windows"}
    if df.empty or not need <= set(df.columns):
        return Table("alignment", "Native vs reference library", [], [], 0)
    ok = latest_per_config(df[df["status"] == "ok"])
    sets = [d for d in ppl_datasets(ok) if ok[f"ppl_{d}"].notna().any()]
    base = ok["method"].map(_base_method)
    same = ["model", "bits", "calib", "seqlen", "max_windows"]
    rows: list[list[Cell]] = []
    for _, lib in ok[base.isin(list(LIBRARY_NATIVE))].iterrows():
        natives = ok[base.isin(LIBRARY_NATIVE[_base_method(lib["method"])])]
        for col in same:
            natives = natives[natives[col].map(_key_text) == _key_text(lib[col])]
        for _, nat in natives.iterrows():
            if _align_settings(nat) != _align_settings(lib) or not _shared_settings_agree(
                    nat, lib):
                continue
            cells = [Cell(str(lib["model"])), Cell(str(lib["bits"])), Cell(str(lib["calib"])),
                     Cell(str(nat["method"])), Cell(str(lib["method"]))]
            for d in sets:
                n, ll = nat.get(f"ppl_{d}"), lib.get(f"ppl_{d}")
                cells += [Cell(_fmt(n, 2), n) if _is_num(n) else Cell(NOT_MEASURED),
                          Cell(_fmt(ll, 2), ll) if _is_num(ll) else Cell(NOT_MEASURED)]
                if _is_num(n) and _is_num(ll):
                    rel = 100.0 * (n / ll - 1.0)
                    cells.append(Cell(f"{rel:+.2f}%", rel, bold=abs(rel) <= 1.0))
                else:
                    cells.append(Cell(NOT_MEASURED))
            tn, tl = nat.get("time_quantize"), lib.get("time_quantize")
            cells += [Cell(_fmt(tn, 0), tn) if _is_num(tn) else Cell(NOT_MEASURED),
                      Cell(_fmt(tl, 0), tl) if _is_num(tl) else Cell(NOT_MEASURED)]
            rows.append(cells)
    header = ["Model", "Bits", "Calib", "Native", "Library"]
    for d in sets:
        lbl = DATASET_LABELS.get(d, d)
        header += [f"{lbl} native", f"{lbl} library", f"{lbl} rel. Δ"]
    header += ["quantize native (s)", "quantize library (s)"]
    foot = ["rel. Δ = native / library - 1; bold: within the 1% target. Pairs share model, "
            "bits, calibration tokens, perplexity windows, group size, grid symmetry, "
            "activation mode and every setting both methods define."]
    return Table("alignment", "Native vs reference library (like-for-like settings)", header,
                 rows, 5, foot if rows else [])


def superseded_table(df: pd.DataFrame) -> Table:
    old = superseded(df)
    if old.empty:
        return Table("superseded", "Superseded runs", [], [], 0)
    header = ["Run id", "Model", "Method", "Bits", "Eval", "Status", "Finished", "Superseded by"]
    rows = [[Cell(str(r["run_id"])), Cell(str(r["model"])), Cell(str(r["method"])),
             Cell(str(r["bits"])), Cell(str(r["eval"])), Cell(str(r["status"])),
             Cell(str(r["finished_at"])), Cell(str(r["superseded_by"]))]
            for _, r in old.iterrows()]
    return Table("superseded", "Superseded runs (a newer record with the same config hash wins)",
                 header, rows, 1)


# ---------------------------------------------------------------------------------------
# published references
# ---------------------------------------------------------------------------------------

REFERENCE_COLUMNS = ("source", "paper", "arxiv", "table", "model", "method", "bits",
                     "group_size", "dataset", "seqlen", "metric", "value", "note")


def load_references(ref_dir: str | Path) -> pd.DataFrame:
    """All reference/*.csv files; each row one published number with its exact location."""
    files = sorted(Path(ref_dir).glob("*.csv")) if Path(ref_dir).is_dir() else []
    frames = []
    for f in files:
        ref = pd.read_csv(f, dtype={"group_size": "Int64", "seqlen": "Int64"},
                          keep_default_na=False, na_values={"group_size": [""], "seqlen": [""]})
        missing = set(REFERENCE_COLUMNS) - set(ref.columns)
        if missing:
            raise ValueError(f"{f}: missing reference columns {sorted(missing)}; expected "
                             f"{', '.join(REFERENCE_COLUMNS)}")
        frames.append(ref.assign(file=f.name))
    if not frames:
        return pd.DataFrame(columns=[*REFERENCE_COLUMNS, "file"])
    return pd.concat(frames, ignore_index=True)


def reproduction_table(df: pd.DataFrame, refs: pd.DataFrame) -> Table:
    """Published vs ours for every ok run matching (model, method, bits, group size, dataset,
    seqlen); windows-capped runs are flagged (not the full protocol)."""
    header = ["Model", "Method", "Bits", "g", "Dataset", "Published", "Ours", "Δ", "Source"]
    if df.empty or refs.empty or "seqlen" not in df.columns:
        return Table("reproduction", "Reproduction vs published", header, [], 5)
    ours = latest_per_config(df[df["status"] == "ok"])
    rows, notes = [], _Notes()
    for _, ref in refs.iterrows():
        metric = f"{ref['metric']}_{ref['dataset']}" if ref["metric"] == "ppl" else ref["metric"]
        if metric not in ours.columns:
            continue
        gs = None if pd.isna(ref["group_size"]) else int(ref["group_size"])
        hit = ours[(ours["model"] == ref["model"]) & (ours["method"] == ref["method"])
                   & (ours["bits"] == ref["bits"]) & ours[metric].notna()
                   & ours["seqlen"].map(lambda s, r=ref: pd.isna(r["seqlen"]) or s == r["seqlen"])]
        if ref["bits"] != "w16a16" and not hit.empty:
            same_g = hit["group_size"].map(lambda g, gs=gs: (None if pd.isna(g) else int(g)) == gs)
            hit = hit[same_g.astype(bool)]
        if hit.empty:
            continue
        for _, r in hit.sort_values("finished_at").tail(1).iterrows():
            ours_v, pub = float(r[metric]), float(ref["value"])
            src = f"{ref['paper']} {ref['table']}"
            mark = ""
            if _is_num(r.get("max_windows")):
                mark = f"[{notes.mark(f'{int(r.max_windows)} windows per set, not the full protocol')}]"
            rows.append([Cell(str(ref["model"])), Cell(str(ref["method"])), Cell(str(ref["bits"])),
                         Cell("-" if gs is None else str(gs)),
                         Cell(DATASET_LABELS.get(ref["dataset"], str(ref["dataset"]))),
                         Cell(_fmt(pub, 2), pub), Cell(_fmt(ours_v, 2) + mark, ours_v),
                         Cell(f"{ours_v - pub:+.2f}", ours_v - pub), Cell(src)])
    footnotes = [f"[{i}] {t}" for i, t in enumerate(notes.items, 1)]
    return Table("reproduction", "Reproduction: published vs ours", header, rows, 5, footnotes,
                 caption="Matched on model, method, bits, group size, dataset and seqlen.")


# ---------------------------------------------------------------------------------------
# renderers
# ---------------------------------------------------------------------------------------


def to_markdown(t: Table) -> str:
    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|")
        return f"**{text}**" if c.bold else text
    if t.empty:
        return f"_{t.title}: no runs._\n"
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in t.columns) + " |",
             "|" + "|".join(":--" if i < t.n_label_cols else "--:"
                            for i in range(len(t.columns))) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    if t.footnotes:
        lines += [""] + [f"{f}  " for f in t.footnotes]
    if t.caption:
        lines += ["", f"_{t.caption}_"]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$", "–": "--",
                  "…": r"\ldots{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(t: Table) -> str:
    """A booktabs table environment; bold best cells; footnotes below the tabular."""
    if t.empty:
        return f"% {latex_escape(t.title)}: no runs\n"
    spec = "l" * t.n_label_cols + "r" * (len(t.columns) - t.n_label_cols)
    def cell(c: Cell) -> str:
        text = latex_escape(c.text)
        return f"\\textbf{{{text}}}" if c.bold else text
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{{latex_escape(t.caption or t.title)}}}",
             f"\\label{{tab:{latex_escape(t.name)}}}",
             f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in t.columns) + " \\\\", "\\midrule"]
    lines += [" & ".join(cell(c) for c in row) + " \\\\" for row in t.rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if t.footnotes:
        lines += ["\\par\\smallskip\\footnotesize " + " \\\\ ".join(latex_escape(f)
                                                                    for f in t.footnotes)]
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """Machine-readable: numbers unformatted, stderr in its own column, status text kept."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    has_se = [any(row[j].stderr is not None for row in t.rows) for j in range(len(t.columns))]
    header = []
    for j, h in enumerate(t.columns):
        header.append(h)
        if has_se[j]:
            header.append(f"{h} stderr")
    w.writerow(header)
    for row in t.rows:
        out = []
        for j, c in enumerate(row):
            out.append(repr(c.value) if c.value is not None and j >= t.n_label_cols else c.text)
            if has_se[j]:
                out.append("" if c.stderr is None else repr(c.stderr))
        w.writerow(out)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# the demo's quick table
# ---------------------------------------------------------------------------------------


def metric_columns(df: pd.DataFrame, prefix: str) -> list[str]:
    return sorted(c for c in df.columns if c.startswith(prefix) and not c.endswith("_stderr"))


def comparison_table(df: pd.DataFrame, prefix: str = "ppl_") -> pd.DataFrame:
    """Rows model x method x bits; one column per metric; failed/skipped shown as status."""
    df = latest_per_config(df)
    cols = metric_columns(df, prefix)
    out = df[[*ID_COLS[:3], "status", *cols]].copy()
    for c in cols:
        out[c] = [f"{v:.3f}" if s == "ok" and pd.notna(v) else (s if s != "ok" else "n/a")
                  for v, s in zip(out[c], out["status"], strict=True)]
    return out.sort_values(list(ID_COLS[:3])).reset_index(drop=True)
