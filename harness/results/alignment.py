"""Native method vs its reference-library run (llm-compressor, GPTQModel) at like-for-like
settings: the relative perplexity difference per dataset."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.evals import metric_info
from harness.results.paper_tables import ppl_metrics
from harness.results.records import latest_per_config, method_label, numeric, with_defaults
from harness.results.tables import NOT_MEASURED, Cell, Table, fmt, is_num

# Reference-library baseline -> the native methods it is compared with (conf/method/llmc_*).
LIBRARY_NATIVE = {"llmc_gptq": ("gptq",), "gptqmodel_gptq": ("gptq",), "llmc_awq": ("awq_noclip", "awq"),
                  "llmc_smoothquant": ("smoothquant",)}
# Settings a native run must share with the library run to be its like-for-like partner
# (besides model, bits, calibration and the perplexity windows).
_ALIGN_KEYS = ("group_size", "symmetric", "act_mode", "alpha")


def _key_text(v: Any) -> str:
    """Comparable text of a config value (None and NaN alike: pandas turns one into the other)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(numeric(v))


def _align_settings(r: pd.Series) -> tuple:
    cfg = r["method_cfg"] if isinstance(r.get("method_cfg"), dict) else {}
    quant_acts = int(cfg.get("a_bits", 16) or 16) < 16
    return tuple(numeric(cfg.get(k)) if k != "act_mode" or quant_acts else None
                 for k in _ALIGN_KEYS)


_NOT_SETTINGS = {"name", "_target_", "keep_fp", "keep_w8", "keep_top_k_sensitive",
                 "sensitivity_from", "sensitivity_groups"}


def _shared_settings_agree(nat: pd.Series, lib: pd.Series) -> bool:
    """Hyper-parameters both configs define (e.g. true_sequential for gptq and
    gptqmodel_gptq, damp for every GPTQ) must be equal; a setting only one side has (the
    native default true_sequential vs llm-compressor, which has none) does not block. A
    record made before a setting existed counts with its config class's default (AWQ's
    ratio_grid: native half_open, llm-compressor's fixed closed grid)."""
    a, b = (with_defaults(r["method_cfg"]) if isinstance(r.get("method_cfg"), dict) else {}
            for r in (nat, lib))
    return all(_key_text(numeric(a[k])) == _key_text(numeric(b[k]))
               for k in (set(a) & set(b)) - _NOT_SETTINGS - set(_ALIGN_KEYS))


def alignment_table(df: pd.DataFrame) -> Table:
    """Native method vs its reference-library run on the same model, bits, calibration,
    windows and grid settings: perplexity of each and the relative difference
    (native / library - 1, in %; the issue's target is |Δ| <= 1%)."""
    need = {"method_cfg", "calib", "seqlen", "max_windows"}
    if df.empty or not need <= set(df.columns):
        return Table("alignment", "Native vs reference library", [], [], 0)
    ok = latest_per_config(df[df["status"] == "ok"])
    sets = ppl_metrics(ok)
    same = ["model", "bits", "calib", "seqlen", "max_windows"]
    rows: list[list[Cell]] = []
    for _, lib in ok[ok["method"].isin(list(LIBRARY_NATIVE))].iterrows():
        natives = ok[ok["method"].isin(LIBRARY_NATIVE[lib["method"]])]
        for col in same:
            natives = natives[natives[col].map(_key_text) == _key_text(lib[col])]
        for _, nat in natives.iterrows():
            if _align_settings(nat) != _align_settings(lib) or not _shared_settings_agree(
                    nat, lib):
                continue
            cells = [Cell(str(lib["model"])), Cell(str(lib["bits"])), Cell(str(lib["calib"])),
                     Cell(method_label(nat["method"], nat.get("variant"))),
                     Cell(method_label(lib["method"], lib.get("variant")))]
            for d in sets:
                n, ll = nat.get(d), lib.get(d)
                cells += [Cell(fmt(n, 2), n) if is_num(n) else Cell(NOT_MEASURED),
                          Cell(fmt(ll, 2), ll) if is_num(ll) else Cell(NOT_MEASURED)]
                if is_num(n) and is_num(ll):
                    rel = 100.0 * (n / ll - 1.0)
                    cells.append(Cell(f"{rel:+.2f}%", rel, bold=abs(rel) <= 1.0))
                else:
                    cells.append(Cell(NOT_MEASURED))
            tn, tl = nat.get("time_quantize"), lib.get("time_quantize")
            cells += [Cell(fmt(tn, 0), tn) if is_num(tn) else Cell(NOT_MEASURED),
                      Cell(fmt(tl, 0), tl) if is_num(tl) else Cell(NOT_MEASURED)]
            rows.append(cells)
    header = ["Model", "Bits", "Calib", "Native", "Library"]
    for d in sets:
        lbl = metric_info(d).label
        header += [f"{lbl} native", f"{lbl} library", f"{lbl} rel. Δ"]
    header += ["quantize native (s)", "quantize library (s)"]
    foot = ["rel. Δ = native / library - 1; bold: within the 1% target. Pairs share model, "
            "bits, calibration tokens, perplexity windows, group size, grid symmetry, "
            "activation mode and every setting both methods define."]
    return Table("alignment", "Native vs reference library (like-for-like settings)", header,
                 rows, 5, foot if rows else [], column_group=3)   # native, library, rel. Δ
