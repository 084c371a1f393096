"""Pure functions: store DataFrame -> comparison tables."""

from __future__ import annotations

import pandas as pd

ID_COLS = ("model", "method", "bits", "eval")


def latest_per_config(df: pd.DataFrame) -> pd.DataFrame:
    """The newest record per config hash (older ones stay in the store)."""
    if df.empty:
        return df
    return df.sort_values("finished_at", kind="stable").groupby("config_hash").tail(1)


def metric_columns(df: pd.DataFrame, prefix: str) -> list[str]:
    return sorted(c for c in df.columns if c.startswith(prefix) and not c.endswith("_stderr"))


def comparison_table(df: pd.DataFrame, prefix: str = "ppl_") -> pd.DataFrame:
    """Rows model x method x bits; one column per metric; failed/skipped shown as status."""
    df = latest_per_config(df)
    cols = metric_columns(df, prefix)
    out = df[[*ID_COLS[:3], "status", *cols]].copy()
    for c in cols:
        out[c] = [f"{v:.3f}" if s == "ok" and pd.notna(v) else (s if s != "ok" else "n/a")
                  for v, s in zip(out[c], out["status"])]
    return out.sort_values(list(ID_COLS[:3])).reset_index(drop=True)
