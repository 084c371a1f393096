"""Numbers that have a source: the committed report tables are what `ptqbench-report`
regenerates from the committed records, and prose numbers derived from committed JSON /
tables (H200 kernel speedups, code agreement) match them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.results import report_cli

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "results" / "runs"

# committed report -> the ptqbench-report filters it was generated with (its README / the
# main README say so)
REPORTS = {
    "smollm2-135m": ["--model", "smollm2-135m", "--eval", "ppl-capped", "--eval", "commonsense",
                     "--eval", "mmlu"],
    "alignment": ["--sweep", "alignment-c4-32x512", "--sweep", "alignment-calib-seeds",
                  "--sweep", "alignment-16windows"],
    "gemma3-270m": ["--model", "gemma3-270m", "--eval", "ppl-capped"],
}


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_committed_report_tables_match_regeneration(tmp_path, name):
    committed = REPO / "reports" / name / "tables"
    assert report_cli.main(["--runs", str(RUNS), *REPORTS[name], "--name", name,
                            "--out-root", str(tmp_path), "--no-plots"]) == 0
    fresh = tmp_path / name / "tables"
    got = sorted(p.name for p in fresh.glob("*.csv"))
    assert got == sorted(p.name for p in committed.glob("*.csv"))
    for f in got:
        assert (fresh / f).read_text() == (committed / f).read_text(), (
            f"reports/{name}/tables/{f} differs from regeneration: rerun ptqbench-report "
            f"{' '.join(REPORTS[name])} --name {name}")


def _speedup_range(gemm: list[dict], variant: str, decode: bool) -> str:
    vals = [r["speedup_vs_fp16"][variant] for r in gemm
            if variant in r["speedup_vs_fp16"] and ((r["M"] <= 16) if decode else (r["M"] >= 1024))]
    return f"{min(vals):.2f}-{max(vals):.2f}x"


def test_h200_speedup_table_is_the_shipped_kernels_json():
    bench = REPO / "results" / "bench" / "h200"
    text = (bench / "README.md").read_text()
    gemm = json.loads((bench / "bench_v3_fast_unpack.json").read_text())["gemm"]
    rows = {"W4A8 GEMM": "w4a8", "W4A8 + activation quant": "w4a8+quant",
            "W8A8 GEMM (Triton)": "w8a8", "W8A8 `torch._int_mm`": "w8a8_int_mm"}
    for label, variant in rows.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:3] == [_speedup_range(gemm, variant, True),
                              _speedup_range(gemm, variant, False)], label


def _agreement(block: int) -> str:
    vals = []
    for pair in ("gptq_vs_gptqmodel", "gptq_vs_llmc_gptq", "llmc_gptq_vs_gptqmodel"):
        text = (REPO / "reports" / "alignment" / "code_agreement" / f"{pair}.md").read_text()
        header = next(ln for ln in text.splitlines() if ln.startswith("| block"))
        names = [c.strip() for c in header.strip("|").split("|")]
        row = next(ln for ln in text.splitlines() if re.match(rf"^\| {block} \|", ln))
        cells = [c.strip() for c in row.strip("|").split("|")]
        vals += [float(v) for n, v in zip(names, cells, strict=True)
                 if n not in ("block", "scales_equal")]
    return f"{100 * min(vals):.1f}-{100 * max(vals):.1f}%"


def test_code_agreement_prose_matches_the_committed_tables():
    block1, block28 = _agreement(1), _agreement(28)
    readme = (REPO / "reports" / "alignment" / "README.md").read_text()
    assert f"{block1} equal codes" in " ".join(readme.split())
    assert f"{block28} by block 28" in " ".join(readme.split())
    assert f"({block28} equal codes by block 28" in " ".join((REPO / "reports" / "README.md").read_text().split())


def test_tiny_check_table_is_the_committed_json():
    data = json.loads((REPO / "reports" / "alignment" / "tiny_check.json").read_text())
    readme = " ".join((REPO / "reports" / "alignment" / "README.md").read_text().split())
    for row in data["rows"]:
        assert f"{row['mse']:.4f}" in readme, row
    assert len(data["rows"]) == 7


def test_every_test_named_in_the_failure_mode_table_exists():
    text = (REPO / "docs" / "failure_modes.md").read_text()
    current = None
    named = []
    for m in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)", text):
        current = m.group(1) or current
        named.append((current, m.group(2)))
    assert len(named) > 20
    for path, name in named:
        assert re.search(rf"^\s*def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name}"


# reports/README.md perplexity table row -> (Method, Bits) of reports/smollm2-135m/tables/perplexity.csv
PROSE_PPL_ROWS = {
    "fp16": ("fp16", "w16a16"),
    "rtn w8a8 (dynamic per-token)": ("rtn", "w8a8"),
    "rtn w8a8 (static per-tensor)": ("rtn (act_mode=static_tensor)", "w8a8"),
    "smoothquant w8a8 (static)": ("smoothquant", "w8a8"),
    "rtn w4a16": ("rtn (act_mode=static_tensor)", "w4a16"),
    "rtn w4a16, llm-compressor's grid max/7.5 (`method.w_grid=full`)": ("rtn (w_grid=full)", "w4a16"),
    "gptq w4a16": ("gptq", "w4a16"),
    "awq w4a16": ("awq", "w4a16"),
    "rtn w4a8 (static per-tensor)": ("rtn (act_mode=static_tensor)", "w4a8"),
    "rtn w4a8 (dynamic per-token)": ("rtn", "w4a8"),
    "smoothquant w4a8 (static)": ("smoothquant", "w4a8"),
    "gptq w4a8 (static)": ("gptq", "w4a8"),
    "awq w4a8 (static)": ("awq", "w4a8"),
    "**fptq w4a8** (shipped, v0 = 0: 207 LAE + static, 3 dynamic)": ("fptq", "w4a8"),
    "fptq w4a8, paper thresholds v0=15, v1=150 (`method=fptq_paper`: 190 static, 17 LAE + "
    "static, 3 dynamic)": ("fptq (v0=15.0)", "w4a8"),
    "fptq w4a8, paper thresholds, static bucket only (v1=15.001: the LAE bucket dynamic)":
        ("fptq (v0=15.0, v1=15.001)", "w4a8"),
    "fptq w4a8, paper thresholds, ablation: all static": ("fptq (policy=all_static, v0=15.0)",
                                                          "w4a8"),
    "fptq w4a8, paper thresholds, ablation: all dynamic": ("fptq (policy=all_dynamic, v0=15.0)",
                                                           "w4a8"),
    "fptq w4a8, paper thresholds, ablation: SmoothQuant in the middle bucket":
        ("fptq (middle=smoothquant, v0=15.0)", "w4a8"),
    "fptq w4a8, paper thresholds, ablation: GPTQ weights (after LAE)":
        ("fptq (v0=15.0, weight_method=gptq)", "w4a8"),
    "fptq w4a8, paper thresholds, MSE-clipped static ranges (`act_range=mse`)":
        ("fptq (act_range=mse, v0=15.0)", "w4a8"),
    "fptq w4a8, thresholds v0=5, v1=150 (more LAE)": ("fptq (v0=5.0)", "w4a8"),
    "fptq w4a8, thresholds v0=30, v1=150": ("fptq (v0=30.0)", "w4a8"),
    "fptq w4a8, thresholds v0=15, v1=50 (more dynamic)": ("fptq (v0=15.0, v1=50.0)", "w4a8"),
    "fptq w4a8, thresholds v0=15, v1=500 (same policy as 150)": ("fptq (v0=15.0, v1=500.0)",
                                                                  "w4a8"),
    "fptq w4a8, shipped + MSE-clipped static ranges (`act_range=mse`)":
        ("fptq (act_range=mse)", "w4a8"),
    "fptq w4a8, shipped + llm-compressor's grid (`w_grid=full`)": ("fptq (w_grid=full)", "w4a8"),
    "quarot w4a8 (Hadamard rotations, GPTQ weights, per-token activations)": ("quarot", "w4a8"),
    "llmqat w4a8 (LLM-QAT, CPU budget: 64 x 256 generated tokens, 100 steps)": ("llmqat", "w4a8"),
    "quip w4a16 (incoherence processing + LDLQ)": ("quip", "w4a16"),
    "quip w3a16": ("quip", "w3a16"),
    "gptq w3a16": ("gptq", "w3a16"),
    "rtn w3a16": ("rtn", "w3a16"),
    "awq w3a16": ("awq", "w3a16"),
    "quip w2a16": ("quip", "w2a16"),
    "gptq w2a16": ("gptq", "w2a16"),
    "rtn w2a16": ("rtn", "w2a16"),
}


def smollm2_table(name: str, keep) -> dict[tuple[str, str], dict[str, str]]:
    """(Method, Bits) -> row of reports/smollm2-135m/tables/<name>.csv, rows where keep(row)."""
    import csv
    with open(REPO / "reports" / "smollm2-135m" / "tables" / f"{name}.csv") as f:
        return {(r["Method"], r["Bits"]): r for r in csv.DictReader(f) if keep(r)}


def readme_rows(header: str) -> list[list[str]]:
    """Cells of each data row of the reports/README.md table whose header starts `header`."""
    text = (REPO / "reports" / "README.md").read_text()
    lines = text[text.index(header):].split("\n\n", 1)[0].splitlines()[2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.strip()]


def test_results_readme_perplexity_table_is_the_committed_report():
    table = smollm2_table("perplexity", lambda r: r["Calib"] in ("-", "c4-32x512"))
    rows = [c for c in readme_rows("| SmolLM2-135M, ppl") if c[0] in PROSE_PPL_ROWS]
    assert len(rows) == len(PROSE_PPL_ROWS)
    for cells in rows:
        csv_row = table[PROSE_PPL_ROWS[cells[0]]]
        want = [f"{float(csv_row[k]):.2f}" for k in ("WikiText-2", "C4", "PTB")]
        assert cells[1:4] == want, (cells[0], want)


# reports/README.md accuracy rows (200 docs per task) -> (Method, Bits) in the SmolLM2 report
PROSE_ACC_ROWS = {
    "fp16": ("fp16", "w16a16"),
    "rtn w4a8 (dynamic per-token)": ("rtn", "w4a8"),
    "smoothquant w4a8 (static)": ("smoothquant", "w4a8"),
    "gptq w4a8 (static)": ("gptq", "w4a8"),
    "awq w4a8 (static)": ("awq", "w4a8"),
    "fptq w4a8 at the paper's thresholds (v0 = 15)": ("fptq (v0=15.0)", "w4a8"),
    "fptq w4a8 as shipped (v0 = 0)": ("fptq", "w4a8"),
    "llmqat w4a8 (CPU budget: 100 steps of 256 tokens)": ("llmqat", "w4a8"),
    "fptq w4a8kv4 as shipped (4-bit KV cache)": ("fptq (kv_bits=4.0)", "w4a8kv4"),
    "llmqat w4a8kv4 (CPU budget, 4-bit KV cache)": ("llmqat (kv_bits=4.0)", "w4a8kv4"),
    "rtn w4a8kv4 (dynamic per-token, 4-bit KV cache)": ("rtn (kv_bits=4.0)", "w4a8kv4"),
    "**quarot w4a8** (GPTQ weights, per-token activations)": ("quarot", "w4a8"),
    "rtn w8a8 (dynamic per-token)": ("rtn", "w8a8"),
    "smoothquant w8a8 (static)": ("smoothquant", "w8a8"),
    "rtn w4a16": ("rtn", "w4a16"),
    "gptq w4a16": ("gptq", "w4a16"),
    "awq w4a16": ("awq", "w4a16"),
}
ACC_COLUMNS = ("arc_challenge", "arc_easy", "boolq", "commonsense_qa", "hellaswag",
               "lambada_openai", "piqa", "winogrande")


def test_results_readme_accuracy_table_is_the_committed_report():
    table = smollm2_table("accuracy", lambda r: r["Docs/task"] == "200")
    rows = {c[0]: c[1:] for c in readme_rows("| SmolLM2-135M, acc %")}
    assert set(rows) == set(PROSE_ACC_ROWS)
    for label, cells in rows.items():
        csv_row = table[PROSE_ACC_ROWS[label]]
        want = [f"{float(csv_row[k]):.1f}" for k in ACC_COLUMNS] + [f"{float(csv_row['Avg.']):.2f}"]
        assert [c.strip("*") for c in cells] == want, (label, want)


def test_quantize_speed_table_is_the_committed_json():
    """docs/methods_gptq_awq.md shows `benchmarks/quantize_speed.py --table` of the committed
    JSON, row for row."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("quantize_speed",
                                                  REPO / "benchmarks" / "quantize_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = json.loads((REPO / "results" / "bench" / "quantize_speed_smollm2_cpu.json").read_text())
    doc = (REPO / "docs" / "methods_gptq_awq.md").read_text()
    for line in bench.markdown_table(result).splitlines():
        assert line in doc, line
