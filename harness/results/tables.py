"""The table model: `Table` of `Cell`s (value, stderr, status text, bold flag), `Column`,
and `build_table` (Δ vs the fp16 row, best per column in bold, status footnotes), rendered by
harness.results.render. Cells are never blank: a failed or skipped run reads "failed" /
"skipped<sup>n</sup>" (the reason in a footnote), a metric an ok run did not measure reads "–"
(footnoted). Also the demo's quick comparison frame.

Row merging: several records can feed one table row (e.g. eval=ppl and eval=lm_eval runs of
the same model x method x bits); per metric the newest ok record that has it wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.evals import metric_info
from harness.results.records import (
    BASELINE_METHOD,
    ID_COLS,
    bits_key,
    latest_per_config,
    method_key,
    table_metrics,
    with_method_label,
)

NOT_MEASURED = "–"


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
    column_group: int = 1           # data columns that belong together (kept in one block)

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


class Notes:
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


def status_cell(status: str, error: Any, notes: Notes) -> Cell:
    if status == "skipped":
        n = notes.mark(f"skipped: {short_reason(error)}")
        return Cell(f"skipped[{n}]")
    if status == "failed":
        n = notes.mark(f"failed: {short_reason(error)}")
        return Cell(f"failed[{n}]")
    return Cell(NOT_MEASURED)


def fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def merge_rows(df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per `keys` combination: per metric the newest ok value (with its stderr);
    `status`/`error` from the newest non-ok record when no ok record exists for the row.
    Rows keyed by method also get its `method_label`."""
    df = latest_per_config(df).sort_values("finished_at", kind="stable")
    out = []
    for key, grp in df.groupby(list(keys), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        ok = grp[grp["status"] == "ok"]
        bad = grp[grp["status"] != "ok"]
        for m in metrics:
            for _, rec in ok.iloc[::-1].iterrows():
                if m in rec and is_num(rec[m]):
                    row[m] = float(rec[m])
                    info = metric_info(m)
                    se = rec.get(info.stderr) if info is not None and info.stderr else None
                    row[f"{m}_stderr"] = float(se) if is_num(se) else None
                    break
        row["status"] = "ok" if not ok.empty else bad.iloc[-1]["status"]
        row["error"] = bad.iloc[-1]["error"] if not bad.empty else None
        row["has_failure"] = not bad.empty
        out.append(row)
    merged = pd.DataFrame(out)
    return with_method_label(merged) if "method" in keys else merged


def _count_key(v: Any) -> tuple[int, int]:
    """"5" < "200" < "all" (docs per task)."""
    return (0, int(v)) if str(v).isdigit() else (1, 0)


def build_table(merged: pd.DataFrame, name: str, title: str, label_cols: Sequence[tuple[str, str]],
                columns: Sequence[Column], group_cols: Sequence[str] = ("model",),
                delta: bool = True, baseline: Callable[[pd.Series], bool] | None = None,
                caption: str = "") -> Table:
    """Rows of `merged` -> Table. Δ vs the fp16 row of the same group; best (excluding the
    baseline) per column and group in bold."""
    notes = Notes()
    baseline = baseline or (lambda r: r["method"] == BASELINE_METHOD)
    if merged.empty:
        return Table(name, title, [], [], 0, caption=caption)
    # rows: fp16 first, then by bit width (wide to narrow), then method and its variants
    merged = merged.assign(_base=merged["method"] != BASELINE_METHOD).sort_values(
        [*group_cols, "_base", "bits", "method",
         *(["variant"] if "variant" in merged.columns else [])],
        key=lambda s: s.map(method_key) if s.name == "method"
        else s.map(bits_key) if s.name == "bits"
        else s.map(_count_key) if s.name == "docs_per_task"
        else s if s.name == "_base"
        else s.astype(str)).drop(columns="_base").reset_index(drop=True)
    group_of = [tuple(r[g] for g in group_cols) for _, r in merged.iterrows()]
    base_rows = {g: r for g, (_, r) in zip(group_of, merged.iterrows(), strict=True)
                 if baseline(r) and r["status"] == "ok"}
    best: dict[tuple, float] = {}
    for g, (_, r) in zip(group_of, merged.iterrows(), strict=True):
        if baseline(r):
            continue
        for c in columns:
            v = r.get(c.metric)
            if is_num(v):
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
            if is_num(v):
                se = r.get(f"{c.metric}_stderr")
                text = fmt(v * c.scale, c.digits)
                if is_num(se):
                    text += f" ± {fmt(se * c.scale, c.digits)}"
                cell = Cell(text, v * c.scale, se * c.scale if is_num(se) else None,
                            bold=not baseline(r) and best.get((g, c.metric)) == v)
            elif r["status"] != "ok" or r.get("has_failure"):
                cell = status_cell(r["status"] if r["status"] != "ok" else "failed",
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
                elif is_num(v) and is_num(bv):
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


def rows_for(df: pd.DataFrame, evaluator: str, metric_cols: Iterable[str]) -> pd.DataFrame:
    """Records relevant to a table: ok ones carrying any of its metrics, and failed/skipped
    ones whose eval config ran `evaluator` (unknown evaluators: kept)."""
    metric_cols = [c for c in metric_cols if c in df.columns]
    has = df[metric_cols].notna().any(axis=1) if metric_cols else pd.Series(False, df.index)
    if "evaluators" in df.columns:
        ran = df["evaluators"].map(lambda e: not isinstance(e, tuple) or not e or evaluator in e)
    else:
        ran = pd.Series(True, df.index)
    return df[(has & (df["status"] == "ok")) | ((df["status"] != "ok") & ran)]


# the demo's quick table
# ---------------------------------------------------------------------------------------


def comparison_table(df: pd.DataFrame, table: str = "perplexity") -> pd.DataFrame:
    """Rows model x method x bits; one column per metric of report `table` (by name);
    failed/skipped shown as status."""
    df = latest_per_config(df)
    cols = sorted(table_metrics(df, table))
    df = df.assign(method=with_method_label(df)["method_label"])
    out = df[[*ID_COLS[:3], "status", *cols]].copy()
    for c in cols:
        digits = metric_info(c).digits
        out[c] = [f"{v:.{digits}f}" if s == "ok" and pd.notna(v) else (s if s != "ok" else "n/a")
                  for v, s in zip(out[c], out["status"], strict=True)]
    order = out.assign(_base=out["method"] != BASELINE_METHOD).sort_values(
        ["model", "_base", "bits", "method"],
        key=lambda s: s.map(bits_key) if s.name == "bits" else s)
    return out.loc[order.index].reset_index(drop=True)
