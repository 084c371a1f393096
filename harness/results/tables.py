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
    conflicts,
    latest_per_config,
    method_key,
    setting_clusters,
    table_metrics,
    with_method_label,
)

NOT_MEASURED = "–"
MEASURED = ("ok", "partial")     # statuses whose metrics are numbers to show


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
    """A cell without a number: its status with the reason in a footnote."""
    if status in ("skipped", "failed", "interrupted", "missing"):
        n = notes.mark(f"{status}: {short_reason(error)}")
        return Cell(f"{status}[{n}]")
    return Cell(NOT_MEASURED)


def fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def merge_rows(df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str],
               ignore: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per `keys` combination and per setting: records whose settings that can change
    a number (records.record_settings) disagree are never merged; they become rows of their
    own, `setting` naming the settings that differ ("eval.seqlen=256"). Within a row, per
    metric the newest ok value (with its stderr); an older ok value it replaces is listed in
    `replaced` (run id -> newer run id). `status`/`error` from the newest non-ok record when
    no ok record exists for the row; `has_failure` when any record of the row is not ok.
    `ignore`: setting prefixes that cannot change this table's metrics ("eval." for the cost
    of quantization). Records none of which measured anything stay one row (their cells
    say skipped / failed, with the reasons). Rows keyed by method also get its
    `method_label`."""
    df = latest_per_config(df).sort_values("finished_at", kind="stable")
    out = []
    for key, grp in df.groupby(list(keys), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        grp = grp.iloc[::-1]                          # newest first
        settings = ([{k: v for k, v in s.items() if not k.startswith(ignore)}
                     if isinstance(s, dict) else {} for s in grp["settings"]]
                    if "settings" in grp.columns else [{}] * len(grp))
        of, labels = setting_clusters(settings)
        if not grp["status"].isin(MEASURED).any():
            of, labels = [0] * len(grp), [""]
        for c, label in enumerate(labels):
            members = grp[[g == c for g in of]]
            row: dict[str, Any] = dict(zip(keys, key, strict=True))
            row["setting"] = label
            row["settings"] = {k: v for s, g in zip(settings, of, strict=True) if g == c
                               for k, v in s.items()}
            row.update(_merge_cluster(members, metrics))
            out.append(row)
    merged = pd.DataFrame(out)
    return with_method_label(merged) if "method" in keys else merged


def _merge_cluster(members: pd.DataFrame, metrics: Sequence[str]) -> dict[str, Any]:
    """members newest first -> metric values, stderr, status, error, replaced."""
    row: dict[str, Any] = {}
    ok = members[members["status"].isin(MEASURED)]
    bad = members[members["status"] != "ok"]
    replaced: dict[str, str] = {}
    for m in metrics:
        newest = None
        for _, rec in ok.iterrows():
            if m not in rec or not is_num(rec[m]):
                continue
            if newest is None:
                newest = rec["run_id"]
                row[m] = float(rec[m])
                info = metric_info(m)
                se = rec.get(info.stderr) if info is not None and info.stderr else None
                row[f"{m}_stderr"] = float(se) if is_num(se) else None
            elif rec["run_id"] != newest:
                replaced.setdefault(str(rec["run_id"]), str(newest))
        if m not in row:    # a partial record says why this metric is missing
            why = [eval_error_for(e, m) for e in members.get("eval_errors", [])]
            why = [w for w in why if w]
            if why:
                row[f"{m}_missing"] = why[0]
    # partial records count as ok for the metrics they have; their missing cells name why
    row["status"] = "ok" if not ok.empty else bad.iloc[0]["status"]
    row["error"] = bad.iloc[0]["error"] if not bad.empty else None
    row["has_failure"] = not bad[bad["status"] != "partial"].empty
    row["replaced"] = replaced
    return row


def eval_error_for(errors: Any, metric: str) -> str | None:
    """The recorded evaluation error behind a missing metric (ppl_c4 <- "ppl_c4",
    acc_piqa <- "piqa")."""
    if not isinstance(errors, dict):
        return None
    for key, why in errors.items():
        if metric == key or metric.endswith(f"_{key}") or metric.startswith(f"{key}_"):
            return str(why)
    return None


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
    if "setting" in merged.columns and merged["setting"].fillna("").astype(bool).any():
        label_cols = [*label_cols, ("setting", "Setting")]    # rows the settings tell apart
    group_of = [tuple(r[g] for g in group_cols) for _, r in merged.iterrows()]
    base_lists: dict[tuple, list[pd.Series]] = {}
    for g, (_, r) in zip(group_of, merged.iterrows(), strict=True):
        if baseline(r) and r["status"] in MEASURED:
            base_lists.setdefault(g, []).append(r)

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
        base = _baseline_for(r, base_lists.get(g, []))
        for c in columns:
            v = r.get(c.metric)
            if is_num(v):
                se = r.get(f"{c.metric}_stderr")
                text = fmt(v * c.scale, c.digits)
                if is_num(se):
                    text += f" ± {fmt(se * c.scale, c.digits)}"
                cell = Cell(text, v * c.scale, se * c.scale if is_num(se) else None,
                            bold=not baseline(r) and best.get((g, c.metric)) == v)
            elif isinstance(r.get(f"{c.metric}_missing"), str):
                cell = status_cell("missing", r[f"{c.metric}_missing"], notes)
            elif r["status"] not in MEASURED or r.get("has_failure"):
                cell = status_cell(r["status"] if r["status"] not in MEASURED else "failed",
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
                         + (", or no fp16 baseline at the same settings for Δ)" if delta
                            else ")"))
    replaced = {a: b for rep in merged.get("replaced", []) if isinstance(rep, dict)
                for a, b in rep.items()}
    if replaced:
        shown = sorted(replaced.items())[:8]
        footnotes.append(f"{len(replaced)} older record(s) at the same settings replaced by a "
                         "newer one: " + ", ".join(f"{a} → {b}" for a, b in shown)
                         + (", …" if len(replaced) > len(shown) else ""))
    return Table(name, title, header, rows, len(label_cols), footnotes, caption)


# Settings a quantized row may differ from its fp16 reference in: calibration (fp16 has
# none) and the group size (fp16 has no groups).
BASELINE_FREE = ("calib.", "method.group_size")


def _baseline_for(r: pd.Series, bases: list[pd.Series]) -> pd.Series | None:
    """The fp16 row a row's Δ is against: one whose shared settings agree with the row's
    (never an fp16 number measured at another sequence length, window cap or data)."""
    mine = r.get("settings") if isinstance(r.get("settings"), dict) else {}
    for b in bases:
        theirs = b.get("settings") if isinstance(b.get("settings"), dict) else {}
        if not conflicts(mine, theirs, ignore=BASELINE_FREE):
            return b
    return None


def rows_for(df: pd.DataFrame, evaluator: str, metric_cols: Iterable[str],
             tasks: Iterable[str] | None = None) -> pd.DataFrame:
    """Records relevant to a table: ok (or partial) ones carrying any of its metrics, and
    the others whose eval config ran `evaluator` (unknown evaluators: kept) and, for lm-eval
    tables, one of `tasks` (a skipped MMLU job is not a row of the commonsense table)."""
    metric_cols = [c for c in metric_cols if c in df.columns]
    has = df[metric_cols].notna().any(axis=1) if metric_cols else pd.Series(False, df.index)
    if "evaluators" in df.columns:
        ran = df["evaluators"].map(lambda e: not isinstance(e, tuple) or not e or evaluator in e)
    else:
        ran = pd.Series(True, df.index)
    if tasks is not None and "tasks" in df.columns:
        wanted = set(tasks)
        ran &= df["tasks"].map(lambda t: not isinstance(t, tuple) or not t or bool(wanted & set(t)))
    measured = df["status"].isin(MEASURED)
    return df[(has & measured) | (~measured & ran)]


# the demo's quick table
# ---------------------------------------------------------------------------------------


def fp16_deltas(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Per row and metric: value - the model's fp16 value (NaN where the model has no single
    measured fp16 row, e.g. fp16 at two settings, or the row did not measure it)."""
    out = pd.DataFrame(index=df.index, columns=list(cols), dtype=float)
    for _, idx in df.groupby("model", sort=False).groups.items():
        rows = df.loc[idx]
        base = rows[(rows["method"] == BASELINE_METHOD) & rows["status"].isin(MEASURED)]
        if len(base) != 1:
            continue
        for c in cols:
            out.loc[idx, c] = (pd.to_numeric(rows[c], errors="coerce")
                               - pd.to_numeric(base[c], errors="coerce").iloc[0])
    return out


def comparison_table(df: pd.DataFrame, table: str = "perplexity",
                     delta: bool = False) -> pd.DataFrame:
    """Rows model x method x bits; one column per metric of report `table` (by name);
    failed/skipped shown as status. delta: also a `Δ metric` column per metric, against
    the model's fp16 row."""
    df = latest_per_config(df).sort_values("finished_at", kind="stable").iloc[::-1]
    cols = sorted(table_metrics(df, table))
    deltas = fp16_deltas(df, cols) if delta else None
    df = df.assign(method=with_method_label(df)["method_label"])
    out = df[[*ID_COLS[:3], "status", *cols]].copy()
    out.insert(3, "setting", "")
    if "settings" in df.columns:
        for _, idx in df.groupby(list(ID_COLS[:3]), sort=False).groups.items():
            sets = [s if isinstance(s, dict) else {} for s in df.loc[idx, "settings"]]
            of, labels = setting_clusters(sets)
            out.loc[idx, "setting"] = [labels[g] for g in of]
    if not out["setting"].astype(bool).any():
        out = out.drop(columns="setting")
    for c in cols:
        digits = metric_info(c).digits
        out[c] = [f"{v:.{digits}f}" if s == "ok" and pd.notna(v) else (s if s != "ok" else "n/a")
                  for v, s in zip(out[c], out["status"], strict=True)]
    if deltas is not None:
        for c in cols:
            digits = metric_info(c).digits
            out[f"Δ {c}"] = ["" if m == BASELINE_METHOD or pd.isna(d) else f"{d:+.{digits}f}"
                             for d, m in zip(deltas[c], out["method"], strict=True)]
    order = out.assign(_base=out["method"] != BASELINE_METHOD).sort_values(
        ["model", "_base", "bits", "method"],
        key=lambda s: s.map(bits_key) if s.name == "bits" else s)
    return out.loc[order.index].reset_index(drop=True)
