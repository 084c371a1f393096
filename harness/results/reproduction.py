"""Published numbers (reports/reference/*.csv) vs ours for every matching ok run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.evals import metric_info
from harness.results.records import latest_per_config
from harness.results.tables import Cell, Notes, Table, fmt, is_num

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


def _dataset_label(metric: str, dataset: str) -> str:
    info = metric_info(metric)
    return info.label if info is not None and info.table == "perplexity" else str(dataset)


def reproduction_table(df: pd.DataFrame, refs: pd.DataFrame) -> Table:
    """Published vs ours for every ok run matching (model, method, bits, group size, dataset,
    seqlen); windows-capped runs are flagged (not the full protocol)."""
    header = ["Model", "Method", "Bits", "g", "Dataset", "Published", "Ours", "Δ", "Source"]
    if df.empty or refs.empty or "seqlen" not in df.columns:
        return Table("reproduction", "Reproduction vs published", header, [], 5)
    ours = latest_per_config(df[df["status"] == "ok"])
    rows, notes = [], Notes()
    for _, ref in refs.iterrows():
        metric = f"{ref['metric']}_{ref['dataset']}" if ref["metric"] == "ppl" else ref["metric"]
        if metric not in ours.columns:
            continue
        gs = None if pd.isna(ref["group_size"]) else int(ref["group_size"])
        hit = ours[(ours["model"] == ref["model"]) & (ours["method"] == ref["method"])
                   & (ours["variant"].fillna("") == "" if "variant" in ours else True)
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
            if is_num(r.get("max_windows")):
                mark = f"[{notes.mark(f'{int(r.max_windows)} windows per set, not the full protocol')}]"
            rows.append([Cell(str(ref["model"])), Cell(str(ref["method"])), Cell(str(ref["bits"])),
                         Cell("-" if gs is None else str(gs)),
                         Cell(_dataset_label(metric, ref["dataset"])),
                         Cell(fmt(pub, 2), pub), Cell(fmt(ours_v, 2) + mark, ours_v),
                         Cell(f"{ours_v - pub:+.2f}", ours_v - pub), Cell(src)])
    footnotes = [f"[{i}] {t}" for i, t in enumerate(notes.items, 1)]
    return Table("reproduction", "Reproduction: published vs ours", header, rows, 5, footnotes,
                 caption="Matched on model, method, bits, group size, dataset and seqlen.")


# ---------------------------------------------------------------------------------------
# renderers
# ---------------------------------------------------------------------------------------
