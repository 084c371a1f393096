"""Reports on a synthetic store: exact cells, Δ and best marking, LaTeX structure, plots,
reproduction matching, the CLI end to end, and W&B offline tracking."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.results.alignment import alignment_table
from harness.results.paper_tables import (
    accuracy_table,
    cost_table,
    fptq_policy_table,
    latency_table,
    mmlu_table,
    perplexity_table,
    perplexity_wide_table,
    superseded_table,
)
from harness.results.records import filter_runs, records_frame
from harness.results.render import latex_escape, to_csv, to_latex, to_markdown
from harness.results.reproduction import load_references, reproduction_table
from harness.results.store import ResultStore, RunRecord
from harness.results.tables import NOT_MEASURED, Table

T0 = "2024-05-01T10:00:{:02d}+00:00"


def _rec(i: int, model: str, method: str, bits: str, status: str = "ok", metrics=None,
         eval: str = "ppl", error=None, timings=None, memory=None, artifacts=None, gs=64,
         evaluators=("ppl",), max_windows=None, cfg_hash=None, sweep=None,
         limit=None) -> RunRecord:
    cfg = {"model": {"name": model}, "method": {"name": method, "group_size": gs},
           "bits": {"name": bits}, "eval": {"name": eval, "evaluators": list(evaluators),
                                            "seqlen": 2048, "max_windows": max_windows,
                                            "limit": limit},
           "calib": {"dataset": "c4", "n_samples": 128, "seqlen": 2048}}
    h = cfg_hash or hashlib.sha256(
        f"{model}|{method}|{bits}|{eval}|{limit}".encode()).hexdigest()[:16]
    return RunRecord(run_id=f"r{i:02d}-{h[:8]}", config_hash=h, status=status, model=model,
                     method=method, bits=bits, eval=eval, config=cfg, metrics=metrics or {},
                     timings=timings or {}, memory=memory or {}, artifacts=artifacts or {},
                     error=error, sweep=sweep, started_at=T0.format(i),
                     finished_at=T0.format(i))


RTN_HASH = "0123456789abcdef"
POLICY = [{"block": b, "linear": lin, "role": lin.split(".")[0], "v": v, "bucket": k,
           "strategy": s}
          for b in range(3)
          for lin, v, k, s in (("self_attn.q_proj", 5.0, 0, "static"),
                               ("mlp.down_proj", 40.0 * (b + 1), 1, "lae+static"),
                               ("mlp.up_proj", 400.0 if b == 2 else 9.0, 2 if b == 2 else 0,
                                "dynamic" if b == 2 else "static"))]


def synthetic_records() -> list[RunRecord]:
    m = "llama-2-7b"
    return [
        _rec(1, m, "fp16", "w16a16", metrics={"ppl_wikitext2": 5.4712, "ppl_c4": 7.2611,
                                              "ppl_ptb": 22.5}),
        # superseded: same config hash as record 3, older
        _rec(2, m, "rtn", "w4a16", metrics={"ppl_wikitext2": 9.9, "ppl_c4": 9.9, "ppl_ptb": 99.0},
             timings={"quantize": 1.0}, memory={"peak_quantize_mb": 10.0}, cfg_hash=RTN_HASH),
        _rec(3, m, "rtn", "w4a16", metrics={"ppl_wikitext2": 5.7301, "ppl_c4": 7.5},
             timings={"quantize": 2.5, "calibration_data": 0.5},
             memory={"peak_quantize_mb": 120.0}, gs=128, cfg_hash=RTN_HASH),
        _rec(4, m, "gptq", "w4a16", metrics={"ppl_wikitext2": 5.6304, "ppl_c4": 7.4,
                                             "ppl_ptb": 23.0},
             timings={"quantize": 30.0}, memory={"peak_quantize_mb": 900.0}, gs=128),
        _rec(5, m, "awq", "w4a16", status="failed",
             error="RuntimeError: CUDA out of memory while solving block 3", gs=128),
        _rec(6, m, "smoothquant", "w4a4", status="skipped",
             error="smoothquant does not support w4a4 (supported: w8a8)"),
        _rec(7, m, "fptq", "w4a8", metrics={"ppl_wikitext2": 5.8, "ppl_c4": 7.7,
                                            "ppl_ptb": 24.0},
             timings={"quantize": 12.0}, memory={"peak_quantize_mb": 300.0},
             artifacts={"fptq_policy": POLICY}),
        # accuracy runs (lm_eval) for two methods
        _rec(8, m, "fp16", "w16a16", eval="zs", evaluators=("lm_eval",),
             metrics={"acc_piqa": 0.781, "acc_piqa_stderr": 0.0096, "acc_boolq": 0.777,
                      "acc_boolq_stderr": 0.0073, "mmlu_avg": 0.45, "mmlu_stem": 0.36,
                      "mmlu_humanities": 0.43, "mmlu_social_sciences": 0.51, "mmlu_other": 0.52,
                      "latency_prefill_ms_b1_p512": 40.0, "decode_tok_s_b1": 30.0}),
        _rec(9, m, "fptq", "w4a8", eval="zs", evaluators=("lm_eval",),
             metrics={"acc_piqa": 0.775, "acc_piqa_stderr": 0.0097, "acc_boolq": 0.760,
                      "acc_boolq_stderr": 0.0075, "mmlu_avg": 0.44, "mmlu_stem": 0.35,
                      "mmlu_humanities": 0.42, "mmlu_social_sciences": 0.50, "mmlu_other": 0.51,
                      "latency_prefill_ms_b1_p512": 25.0, "decode_tok_s_b1": 55.0}),
        _rec(10, m, "rtn", "w4a8", eval="zs", evaluators=("lm_eval",),
             metrics={"acc_piqa": 0.700, "acc_boolq": 0.650,
                      "latency_prefill_ms_b1_p512": 24.0, "decode_tok_s_b1": 56.0}),
    ]


@pytest.fixture
def store(tmp_path) -> ResultStore:
    s = ResultStore(tmp_path / "runs")
    for r in synthetic_records():
        s.write(r)
    return s


@pytest.fixture
def df(store) -> pd.DataFrame:
    return records_frame(store)


def cells(table: Table, *labels: str) -> dict[str, str]:
    """The row whose label cells equal `labels`, as {header: text}."""
    for row in table.rows:
        if tuple(c.text for c in row[: len(labels)]) == labels:
            return {h: c.text for h, c in zip(table.columns, row, strict=True)}
    raise AssertionError(f"no row {labels} in {table.name}")


def test_perplexity_cells_delta_best_and_status(df):
    t = perplexity_table(df)
    assert t.columns == ["Model", "Method", "Bits", "WikiText-2", "Δ WikiText-2", "C4", "Δ C4",
                         "PTB", "Δ PTB"]
    fp = cells(t, "llama-2-7b", "fp16", "w16a16")
    assert (fp["WikiText-2"], fp["Δ WikiText-2"]) == ("5.47", "ref")
    gptq = cells(t, "llama-2-7b", "gptq", "w4a16")
    assert (gptq["WikiText-2"], gptq["Δ WikiText-2"], gptq["PTB"]) == ("5.63", "+0.16", "23.00")
    rtn = cells(t, "llama-2-7b", "rtn", "w4a16")  # the newer record won; PTB not measured
    assert (rtn["WikiText-2"], rtn["C4"], rtn["PTB"], rtn["Δ PTB"]) == ("5.73", "7.50", "–", "–")
    awq = cells(t, "llama-2-7b", "awq", "w4a16")
    assert awq["WikiText-2"] == "failed[1]" and awq["C4"] == "failed[1]"
    sq = cells(t, "llama-2-7b", "smoothquant", "w4a4")
    assert sq["WikiText-2"] == "skipped[2]"
    assert t.footnotes[0] == "[1] failed: RuntimeError: CUDA out of memory while solving block 3"
    assert t.footnotes[1] == "[2] skipped: smoothquant does not support w4a4 (supported: w8a8)"
    bold = {(row[1].text, h) for row in t.rows for h, c in zip(t.columns, row, strict=True)
            if c.bold}
    assert bold == {("gptq", "WikiText-2"), ("gptq", "C4"), ("gptq", "PTB")}
    md = to_markdown(t)
    assert "| llama-2-7b | gptq | w4a16 | **5.63** | +0.16 | **7.40** |" in md


def test_superseded_listed_not_hidden(df):
    t = superseded_table(df)
    assert [row[0].text for row in t.rows] == ["r02-01234567"]
    assert t.rows[0][-1].text == "r03-01234567"


def test_accuracy_mmlu_latency_cost_policy(df):
    acc = accuracy_table(df)
    assert acc.columns[3:] == ["boolq", "Δ boolq", "piqa", "Δ piqa", "Avg.", "Δ Avg."]
    f = cells(acc, "llama-2-7b", "fptq", "w4a8")
    assert (f["piqa"], f["Δ piqa"], f["Avg."]) == ("77.50 ± 0.97", "-0.60", "76.75")
    assert acc.rows[1][5].bold  # fptq piqa beats rtn
    assert "ppl" not in " ".join(acc.columns)
    mmlu = mmlu_table(df)
    assert cells(mmlu, "llama-2-7b", "fptq", "w4a8")["Avg."] == "44.00"
    assert [r[1].text for r in mmlu.rows] == ["fp16", "fptq"]  # rtn ran no MMLU
    lat = latency_table(df)
    row = cells(lat, "llama-2-7b", "rtn", "w4a8", "1")
    assert (row["prefill p512 (ms)"], row["decode (tok/s)"], row["Δ decode (tok/s)"]) == \
        ("24.00", "56.00", "+26.00")
    cost = cost_table(df)
    assert cells(cost, "llama-2-7b", "gptq", "w4a16")["quantize (s)"] == "30.00"
    assert cells(cost, "llama-2-7b", "awq", "w4a16")["quantize (s)"] == "failed[1]"
    pol = fptq_policy_table(df)
    assert pol.columns == ["Model", "Method", "Bits", "dynamic", "lae+static", "static", "total"]
    assert [c.text for c in pol.rows[0]] == ["llama-2-7b", "fptq", "w4a8", "1", "3", "5", "9"]


def test_wide_perplexity_layout(df):
    t = perplexity_wide_table(df)
    assert t.columns[:4] == ["Model", "fp16 w16a16 WikiText-2", "fp16 w16a16 C4",
                             "fp16 w16a16 PTB"]
    row = cells(t, "llama-2-7b")
    assert row["awq w4a16 WikiText-2"] == "failed[1]"
    assert row["gptq w4a16 WikiText-2"] == "5.63"
    bold = [h for h, c in zip(t.columns, t.rows[0], strict=True) if c.bold]
    assert bold == ["gptq w4a16 WikiText-2", "gptq w4a16 C4", "gptq w4a16 PTB"]


def test_latex_is_balanced_and_escaped(df):
    for t in (perplexity_table(df), accuracy_table(df), fptq_policy_table(df)):
        tex = to_latex(t)
        for env in ("table", "tabular"):
            assert tex.count(f"\\begin{{{env}}}") == tex.count(f"\\end{{{env}}}") == 1
        assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
        spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1)
        body = tex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
        header = tex.split("\\toprule\n")[1].split("\n")[0]
        for line in [header, *body]:
            assert line.endswith("\\\\")
            assert len(re.findall(r"(?<!\\)&", line)) == len(spec) - 1
        assert re.search(r"(?<!\\)_", tex.replace("\\label{tab:", "")) is None or "fptq_policy" in tex
    tex = to_latex(perplexity_table(df))
    assert r"\textbf{5.63}" in tex and r"llama-2-7b & smoothquant" in tex
    assert r"$\Delta$ WikiText-2" in tex
    assert latex_escape("acc_norm 50% & $x#") == r"acc\_norm 50\% \& \$x\#"


def test_csv_keeps_numbers_and_stderr(df):
    text = to_csv(accuracy_table(df))
    head = text.splitlines()[0]
    assert head == ("Model,Method,Bits,boolq,boolq stderr,Δ boolq,piqa,piqa stderr,Δ piqa,Avg.,"
                    "Δ Avg.")
    assert "llama-2-7b,fptq,w4a8,76.0,0.75,-1.7" in text


def _refs(tmp_path: Path) -> Path:
    d = tmp_path / "ref"
    d.mkdir()
    (d / "qserve.csv").write_text(
        "source,paper,arxiv,table,model,method,bits,group_size,dataset,seqlen,metric,value,note\n"
        "qserve-readme,QServe,2405.04532,README Accuracy Evaluation,llama-2-7b,fp16,w16a16,,"
        "wikitext2,2048,ppl,5.47,\n"
        "qserve-readme,QServe,2405.04532,README Accuracy Evaluation,llama-2-7b,gptq,w4a16,128,"
        "wikitext2,2048,ppl,5.63,GPTQ-R\n"
        "qserve-readme,QServe,2405.04532,README Accuracy Evaluation,llama-2-7b,awq,w4a16,128,"
        "wikitext2,2048,ppl,5.60,\n"
        "qserve-readme,QServe,2405.04532,README Accuracy Evaluation,llama-2-7b,rtn,w4a16,64,"
        "wikitext2,2048,ppl,6.00,group size differs from ours\n")
    return d


def test_reproduction_matches_model_method_bits_group_dataset(df, tmp_path):
    t = reproduction_table(df, load_references(_refs(tmp_path)))
    got = [[c.text for c in row] for row in t.rows]
    assert got == [
        ["llama-2-7b", "fp16", "w16a16", "-", "WikiText-2", "5.47", "5.47", "+0.00",
         "QServe README Accuracy Evaluation"],
        ["llama-2-7b", "gptq", "w4a16", "128", "WikiText-2", "5.63", "5.63", "+0.00",
         "QServe README Accuracy Evaluation"],
    ]  # awq failed (no ok run), rtn ran at g128 not g64


def test_committed_references_are_well_formed():
    refs = load_references(Path(__file__).resolve().parent.parent / "reports" / "reference")
    assert not refs.empty
    assert refs["value"].map(lambda v: float(v) > 0).all()
    assert (refs["table"].str.len() > 0).all() and (refs["source"].str.len() > 0).all()


def test_plots_png_and_svg(df, tmp_path):
    from harness.results import plots as P

    ppl = P.plot_ppl_vs_bits(df, tmp_path / "ppl")
    assert "ppl" in ppl        # the main methods' figure (ablations / libraries when present)
    written = [*(p for paths in ppl.values() for p in paths), *P.plot_cost(df, tmp_path / "cost"),
               *P.plot_accuracy_vs_latency(df, tmp_path / "acc"),
               *P.plot_fptq_policy(POLICY, tmp_path / "pol", {"v0": 15.0, "v1": 150.0})]
    bench = {"env": {"device": "H100", "peaks": {"hbm_gbs": 3350.0, "int8_tops": 1979.0,
                                                 "fp16_tflops": 989.0}},
             "gemm": [{"N": 4096, "K": 4096, "M": m, "speedup_vs_fp16": {"w4a8+quant": s}}
                      for m, s in ((1, 2.5), (16, 2.2), (256, 1.3))]}
    written += P.plot_kernel_speedup(bench, tmp_path / "kern")
    assert sorted(p.name for p in written) == sorted(
        f"{s}.{e}" for s in ("ppl", "cost", "acc", "pol", "kern") for e in ("png", "svg"))
    for p in written:
        assert p.stat().st_size > 1000
        head = p.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<?xml" in head
    assert P.method_color("gptq") == P.method_color("gptq") != P.method_color("awq")
    assert P.pareto_front([(1, 50), (2, 60), (3, 55), (0.5, 40)]) == [(0.5, 40), (1, 50), (2, 60)]


def test_cli_end_to_end(store, tmp_path, capsys):
    from harness.results.report_cli import main

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "h100.json").write_text(json.dumps({"env": {"device": "H100", "peaks": None},
                                                 "gemm": [{"N": 8, "K": 8, "M": 1,
                                                           "speedup_vs_fp16": {"w4a8+quant": 2}},
                                                          {"N": 8, "K": 8, "M": 4,
                                                           "speedup_vs_fp16": {"w4a8+quant": 3}}]}))
    (bench / "h200").mkdir()  # one folder per device
    (bench / "h200" / "bench.json").write_text((bench / "h100.json").read_text())
    out_root = tmp_path / "reports"
    rc = main(["--runs", str(store.root), "--name", "syn", "--out-root", str(out_root),
               "--references", str(_refs(tmp_path)), "--bench", str(bench),
               "--export", str(tmp_path / "all.parquet")])
    assert rc == 0
    d = out_root / "syn"
    md = (d / "report.md").read_text()
    for name in ("perplexity", "accuracy", "mmlu", "latency", "cost", "fptq_policy",
                 "reproduction", "superseded"):
        assert (d / "tables" / f"{name}.csv").stat().st_size > 0
        assert (d / "tables" / f"{name}.tex").stat().st_size > 0
        assert f"tables/{name}.csv" in md
    for plot in ("ppl_vs_bits", "cost", "accuracy_vs_latency", "fptq_policy_llama-2-7b_w4a8_fptq",
                 "kernel_speedup_h100", "kernel_speedup_h200_bench"):
        assert (d / "plots" / f"{plot}.png").exists() and (d / "plots" / f"{plot}.svg").exists()
        assert f"](plots/{plot}.png)" in md
    assert "r02-01234567" in md  # superseded run listed
    assert len(pd.read_parquet(tmp_path / "all.parquet")) == len(synthetic_records())
    assert not list(d.rglob("*.tmp"))

    capsys.readouterr()
    assert main(["--runs", str(store.root), "--model", "llama-2-7b", "--eval", "ppl",
                 "--print"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in out.splitlines()}
    assert ("llama-2-7b", "gptq", "w4a16", "ok", "7.40", "23.00", "5.63",
            "+0.14", "+0.50", "+0.16") in rows                # Δ vs fp16
    assert ("llama-2-7b", "fp16", "w16a16", "ok", "7.26", "22.50", "5.47", "", "", "") in rows
    assert ("llama-2-7b", "fptq", "w4a8", "1", "3", "5", "9") in rows   # FPTQ policy counts
    assert not any("awq" in r for r in rows)          # a failed job: one line, not a row
    assert "Not shown: 1 failed, 1 skipped jobs (`ptqbench-report --show-skipped`" in out
    assert main(["--runs", str(store.root), "--model", "llama-2-7b", "--eval", "ppl",
                 "--print", "--show-skipped"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in out.splitlines()}
    assert ("llama-2-7b", "awq", "w4a16", "failed", "failed", "failed", "failed",
            "", "", "") in rows

    assert main(["--runs", str(store.root), "--name", "f", "--out-root", str(out_root),
                 "--method", "fp16", "--method", "rtn", "--until",
                 "2024-05-01T10:00:02Z", "--no-plots"]) == 0
    md = (out_root / "f" / "report.md").read_text()
    assert "| llama-2-7b | rtn | w4a16 | **9.90** |" in md and "gptq" not in md.split("##")[1]


def test_cli_ppl_only_store(tmp_path):
    from harness.results.report_cli import main

    s = ResultStore(tmp_path / "runs")
    s.write(_rec(1, "smollm2-135m", "fp16", "w16a16", eval="ppl-quick", max_windows=4,
                 metrics={"ppl_wikitext2": 20.1}))
    s.write(_rec(2, "smollm2-135m", "rtn", "w4a8", eval="ppl-quick", max_windows=4,
                 metrics={"ppl_wikitext2": 25.3}, timings={"quantize": 1.0}))
    assert main(["--runs", str(s.root), "--model", "smollm2-135m", "--name", "smollm2-135m",
                 "--out-root", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "smollm2-135m" / "report.md").read_text()
    assert "| smollm2-135m | rtn | w4a8 | **25.30** | +5.20 |" in md
    assert "Zero-shot accuracy" not in md and "no runs" not in md   # no empty sections


def test_report_regenerates_byte_identical(store, tmp_path):
    """The same records give the same report.md, tables and SVG/PNG plots (no dates, no
    random ids), so regenerating a committed report leaves no diff."""
    from harness.results.report_cli import main

    outs = []
    (tmp_path / "nobench").mkdir()      # no kernel JSON: no kernel plots
    for k in range(2):
        root = tmp_path / f"out{k}"
        assert main(["--runs", str(store.root), "--name", "syn", "--out-root", str(root),
                     "--bench", str(tmp_path / "nobench")]) == 0
        outs.append({p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()})
    assert outs[0].keys() == outs[1].keys() and any(p.suffix == ".svg" for p in outs[0])
    assert [p for p in outs[0] if outs[0][p] != outs[1][p]] == []


def test_rewriting_a_report_removes_tables_and_plots_it_no_longer_has(store, tmp_path):
    """A table or plot an earlier run wrote (superseded.csv once nothing is superseded) must
    not linger beside the current ones: it would be read as current."""
    from harness.results.report_cli import main

    (tmp_path / "nobench").mkdir()
    args = ["--runs", str(store.root), "--name", "syn", "--bench", str(tmp_path / "nobench")]
    assert main([*args, "--out-root", str(tmp_path / "fresh")]) == 0
    rep = tmp_path / "again" / "syn"
    for stale in ("tables/superseded.csv", "tables/superseded.tex", "plots/old_policy.svg"):
        (rep / stale).parent.mkdir(parents=True, exist_ok=True)
        (rep / stale).write_text("stale")
    (rep / "notes.txt").write_text("not ours: kept")
    assert main([*args, "--out-root", str(tmp_path / "again")]) == 0
    files = {p.relative_to(rep) for p in rep.rglob("*") if p.is_file()}
    fresh = {p.relative_to(tmp_path / "fresh" / "syn")
             for p in (tmp_path / "fresh" / "syn").rglob("*") if p.is_file()}
    assert files == fresh | {Path("notes.txt")}


def test_wide_markdown_is_split_into_blocks_of_at_most_12_columns(df):
    t = perplexity_wide_table(df)
    assert len(t.columns) > 12
    md = to_markdown(t)
    headers = [line for line in md.splitlines() if line.startswith("| Model")]
    assert len(headers) > 1 and all(line.count(" | ") + 1 <= 12 for line in headers)
    for line in headers:   # a method x bits keeps its datasets together in one block
        cols = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cols) % t.column_group == 0


def test_rows_fp16_first_then_bits_then_method(df):
    t = perplexity_table(df)
    keys = [(r[1].text, r[2].text) for r in t.rows if r[0].text == "llama-2-7b"]
    assert keys[0][0] == "fp16"
    bits = [b for _, b in keys[1:]]
    order = ["w16a16", "w8a8", "w4a16", "w4a8", "w3a16", "w2a16"]
    assert bits == sorted(bits, key=lambda b: order.index(b) if b in order else 99)


def test_wandb_offline_run_stays_in_run_dir_and_never_writes_the_key(compose_cfg, tmp_path,
                                                                     monkeypatch):
    pytest.importorskip("wandb")
    from conftest import TINY_QUICK

    from harness.run.pipeline import run_one

    marker = "ptqbench-test-key-" + "7" * 22
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_API_KEY", marker)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR",
                "WANDB_DIR"):
        monkeypatch.setenv(var, "unset")  # recorded, so the tracker's setdefault is undone
        monkeypatch.delenv(var)
    cfg = compose_cfg(*TINY_QUICK, "method=fp16", "bits=w16a16", "tracking=wandb")
    rec = run_one(cfg)
    assert rec.status == "ok", rec.error
    results = tmp_path / "results"
    run_dir = results / "artifacts" / rec.run_id
    assert list(run_dir.rglob("*.wandb")), "no offline W&B run file"
    outside = [p for p in tmp_path.rglob("*") if p.is_file()
               and run_dir not in p.parents and p.parent != results / "runs"
               and p.parent != results / "runs" / ".locks"
               and results / "cache" not in p.parents]
    assert outside == []
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert marker.encode() not in p.read_bytes(), p


@pytest.mark.parametrize("name,datasets", [("qserve_llama2_wikitext", ["wikitext2"]),
                                           ("gptq_llama_ppl", ["wikitext2", "ptb", "c4"])])
def test_reproduction_experiments_compose(compose_cfg, name, datasets):
    cfg = compose_cfg(f"experiment={name}", "method=fp16", "bits=w16a16")
    assert list(cfg.eval.datasets) == datasets and cfg.eval.seqlen == 2048
    assert cfg.eval.max_windows is None and cfg.eval.evaluators == ["ppl"]
    assert (cfg.calib.dataset, cfg.calib.n_samples, cfg.calib.seqlen) == ("c4", 128, 2048)
    assert cfg.sweep == name


def test_ablation_runs_get_variant_labels_and_policy_dicts_are_read(tmp_path):
    store = ResultStore(tmp_path)
    for i, policy in enumerate(("layerwise", "layerwise", "all_static")):
        rec = _rec(i, "m", "fptq", "w4a8", cfg_hash=f"h{i}", metrics={"ppl_ptb": 10.0 + i},
                   artifacts={"fptq_policy": {"rows": POLICY, "counts": {}}})
        rec.config["method"].update(policy=policy, v0=15 if i else 5)
        store.write(rec)
    df = records_frame(store).sort_values("run_id")
    assert list(df["method"]) == ["fptq"] * 3          # the variant is its own column
    assert list(df["variant"]) == ["v0=5.0", "", "policy=all_static"]
    t = perplexity_table(df)
    assert [r[1].text for r in t.rows] == ["fptq", "fptq (policy=all_static)", "fptq (v0=5.0)"]
    assert all(isinstance(p, list) and len(p) == len(POLICY) for p in df["fptq_policy"])


def test_bare_method_label_is_the_shipped_setting_even_in_the_minority(tmp_path):
    """Three paper-threshold ablations (v0=15) and one run at what method=fptq ships (the
    FPTQConfig default v0=0): the shipped one is the bare "fptq", the others say v0=15.0;
    rtn's act_mode is read from conf/method/rtn.yaml (dynamic_token), not its dataclass."""
    store = ResultStore(tmp_path)
    fptq, rtn = {"_target_": "methods.fptq.FPTQConfig"}, {"_target_": "methods.rtn.RTNConfig"}
    settings = [("fptq", {**fptq, "v0": 15.0, "policy": p})
                for p in ("layerwise", "all_static", "all_dynamic")]
    settings += [("fptq", {**fptq, "v0": 0.0, "policy": "layerwise"}),
                 *[("rtn", {**rtn, "act_mode": m})
                   for m in ("static_tensor", "static_tensor", "dynamic_token")]]
    for i, (method, cfg) in enumerate(settings):
        rec = _rec(i, "m", method, "w4a8", cfg_hash=f"h{i}", metrics={"ppl_ptb": 10.0 + i})
        rec.config["method"].update(cfg)
        store.write(rec)
    df = records_frame(store).sort_values("run_id")
    assert list(df["variant"]) == ["v0=15.0", "policy=all_static, v0=15.0",
                                   "policy=all_dynamic, v0=15.0", "", "act_mode=static_tensor",
                                   "act_mode=static_tensor", ""]


def test_method_filter_selects_variants(tmp_path):
    store = ResultStore(tmp_path)
    for i, policy in enumerate(("layerwise", "layerwise", "all_static")):
        rec = _rec(i, "m", "fptq", "w4a8", cfg_hash=f"h{i}", metrics={"ppl_ptb": 10.0 + i})
        rec.config["method"]["policy"] = policy
        store.write(rec)
    store.write(_rec(9, "m", "rtn", "w4a8", metrics={"ppl_ptb": 20.0}))
    df = records_frame(store)
    assert sorted(filter_runs(df, method=["fptq"])["variant"]) == ["", "", "policy=all_static"]
    assert list(filter_runs(df, method=["fptq (policy=all_static)"])["run_id"]) == ["r02-h2"]


def test_alignment_pairs_native_with_library_at_same_settings(tmp_path):
    store = ResultStore(tmp_path)
    runs = [("llmc_gptq", False, 10.0, 40.0), ("gptq", False, 10.05, 20.0),
            ("gptq", True, 12.0, 20.0),          # symmetric grid: not like for like
            ("llmc_smoothquant", True, 8.0, 5.0)]  # no native partner: no row
    for i, (method, sym, ppl, t) in enumerate(runs):
        rec = _rec(i, "m", method, "w4a16", cfg_hash=f"h{i}", metrics={"ppl_ptb": ppl},
                   timings={"quantize": t})
        rec.config["method"].update(symmetric=sym, a_bits=16, act_mode="static_tensor")
        store.write(rec)
    t = alignment_table(records_frame(store))
    assert len(t.rows) == 1
    row = cells(t, "m", "w4a16", "c4-128x2048")
    assert row["Library"] == "llmc_gptq" and row["Native"].startswith("gptq")
    assert row["PTB native"] == "10.05" and row["PTB library"] == "10.00"
    assert row["PTB rel. Δ"] == "+0.50%"
    assert row["quantize native (s)"] == "20" and row["quantize library (s)"] == "40"
    assert "**+0.50%**" in to_markdown(t)   # within the 1% target: bold


def test_records_made_before_an_option_existed_are_not_labelled_by_it(tmp_path):
    store = ResultStore(tmp_path)
    for i, extra in enumerate(({}, {"inputs_from": "quantized"}, {"inputs_from": "quantized"},
                               {"inputs_from": "fp"})):
        rec = _rec(i, "m", "awq", "w4a16", cfg_hash=f"h{i}", metrics={"ppl_ptb": 10.0 + i})
        rec.config["method"].update(extra)
        store.write(rec)
    df = records_frame(store).sort_values("run_id")
    assert list(df["variant"]) == ["", "", "", "inputs_from=fp"]


def test_accuracy_rows_stay_apart_per_docs_limit(tmp_path):
    """A 1-doc pipeline check never merges into a 200-doc measurement; Δ is taken against
    the fp16 row at the same limit."""
    acc = {"evaluators": ("lm_eval",), "eval": "commonsense"}
    store = ResultStore(tmp_path / "runs")
    for i, (method, bits, limit, piqa) in enumerate([("fp16", "w16a16", 1, 1.0),
                                                     ("fptq", "w4a8", 1, 0.0),
                                                     ("fp16", "w16a16", 200, 0.64),
                                                     ("fptq", "w4a8", 200, 0.60)]):
        store.write(_rec(i, "m", method, bits, metrics={"acc_piqa": piqa}, limit=limit, **acc))
    t = accuracy_table(records_frame(store))
    assert t.columns[:4] == ["Model", "Method", "Bits", "Docs/task"]
    assert cells(t, "m", "fptq", "w4a8", "200")["Δ piqa"] == "-4.00"
    assert cells(t, "m", "fptq", "w4a8", "1")["Δ piqa"] == "-100.00"
    one = accuracy_table(filter_runs(records_frame(store), sweep=None).query(
        "docs_per_task == '200'"))
    assert one.columns[:4] == ["Model", "Method", "Bits", "piqa"]
    assert "First 200 docs per task" in one.caption


def test_perplexity_rows_stay_apart_per_calibration(tmp_path):
    """Runs on other calibration draws (seeds) get their own rows, never the latest-wins
    merge of one (model, method, bits) row; fp16 needs no calibration and stays one row."""
    store = ResultStore(tmp_path / "runs")
    rows = [("fp16", "w16a16", 0, 10.0), ("gptq", "w4a16", 0, 12.0), ("gptq", "w4a16", 1, 12.5)]
    for i, (method, bits, seed, ppl) in enumerate(rows):
        rec = _rec(i, "m", method, bits, metrics={"ppl_wikitext2": ppl},
                   cfg_hash=f"{i:016d}")
        rec.config["calib"]["seed"] = seed
        store.write(rec)
    df = records_frame(store)
    t = perplexity_table(df)
    assert t.columns[:4] == ["Model", "Method", "Bits", "Calib"]
    assert cells(t, "m", "gptq", "w4a16", "c4-128x2048")["WikiText-2"] == "12.00"
    assert cells(t, "m", "gptq", "w4a16", "c4-128x2048-seed1")["Δ WikiText-2"] == "+2.50"
    wide = perplexity_wide_table(df)
    assert "gptq @c4-128x2048-seed1 w4a16 WikiText-2" in wide.columns


def test_alignment_pairs_require_equal_shared_settings(tmp_path):
    """gptqmodel_gptq defines true_sequential like the native gptq, so only the native run
    with the same value is its partner; llm-compressor's GPTQ has no such setting and pairs
    with both."""
    store = ResultStore(tmp_path)
    runs = [("gptqmodel_gptq", False, 10.0), ("llmc_gptq", None, 10.2),
            ("gptq", False, 10.05), ("gptq", True, 10.5)]
    for i, (method, ts, ppl) in enumerate(runs):
        rec = _rec(i, "m", method, "w4a16", cfg_hash=f"h{i}", metrics={"ppl_ptb": ppl})
        rec.config["method"].update(symmetric=False, a_bits=16, damp=0.01)
        if ts is not None:
            rec.config["method"]["true_sequential"] = ts
        if method == "gptq":    # the tie 1:1 is labelled against GPTQConfig's default (True)
            rec.config["method"]["_target_"] = "methods.gptq.GPTQConfig"
        store.write(rec)
    t = alignment_table(records_frame(store))
    pairs = sorted((r[4].text, r[3].text) for r in t.rows)
    assert [lib for lib, _ in pairs] == ["gptqmodel_gptq", "llmc_gptq", "llmc_gptq"]
    assert pairs[0][1] == "gptq (true_sequential=False)"
    assert cells(t, "m", "w4a16", "c4-128x2048", pairs[0][1], "gptqmodel_gptq")["PTB native"] \
        == "10.05"


def test_alignment_pairs_fill_settings_older_records_lack(tmp_path):
    """Records made before AWQ's ratio_grid existed ran with each class's default: the old
    native run (half_open) is no partner of llm-compressor's (fixed closed grid), the new
    native run with ratio_grid=closed is."""
    store = ResultStore(tmp_path)
    runs = [("llmc_awq", "methods.baselines.LLMCompressorAWQConfig", None, 10.0),
            ("awq_noclip", "methods.awq.AWQConfig", None, 9.7),
            ("awq_noclip", "methods.awq.AWQConfig", "closed", 10.01)]
    for i, (method, target, grid, ppl) in enumerate(runs):
        rec = _rec(i, "m", method, "w4a16", cfg_hash=f"h{i}", metrics={"ppl_ptb": ppl})
        rec.config["method"].update(symmetric=False, a_bits=16, _target_=target, n_grid=20)
        if grid is not None:
            rec.config["method"]["ratio_grid"] = grid
        store.write(rec)
    t = alignment_table(records_frame(store))
    assert [(r[3].text, r[4].text) for r in t.rows] == [
        ("awq_noclip (ratio_grid=closed)", "llmc_awq")]
    assert cells(t, "m", "w4a16", "c4-128x2048")["PTB rel. Δ"] == "+0.10%"


def test_skipped_baseline_job_is_not_a_reference(tmp_path):
    store = ResultStore(tmp_path)
    store.write(_rec(0, "m", "fp16", "w16a16", metrics={"ppl_ptb": 10.0}))
    store.write(_rec(1, "m", "fp16", "w4a8", status="skipped",
                     error="fp16 does not support w4a8 (supported: w16a16)"))
    t = perplexity_table(records_frame(store))
    assert cells(t, "m", "fp16", "w16a16")["Δ PTB"] == "ref"
    row = cells(t, "m", "fp16", "w4a8")
    assert row["PTB"].startswith("skipped") and row["Δ PTB"] == NOT_MEASURED


def test_every_committed_metric_is_described_by_one_evaluator():
    """The report reads label, unit, direction and stderr from the evaluator that made a
    metric (harness.evals.metric_info), never from name prefixes; each name has one owner."""
    import importlib

    from harness.evals import METRIC_INFO, metric_info

    describers = {ev: getattr(importlib.import_module(t.partition(":")[0]), t.partition(":")[2])
                  for ev, t in METRIC_INFO.items()}
    pipeline_made = {"avg_bits_linear", "avg_bits_per_weight", "model_size_bytes"}
    names = set()
    for f in (Path(__file__).resolve().parent.parent / "results" / "runs").glob("*.json"):
        names |= set(json.loads(f.read_text()).get("metrics") or {})
    assert names
    for name in sorted(names - pipeline_made):
        owners = [ev for ev, describe in describers.items() if describe(name) is not None]
        if name.endswith("_stderr"):
            assert owners == [], name
            assert any(metric_info(m) and metric_info(m).stderr == name for m in names), name
        else:
            assert len(owners) == 1, (name, owners)
    assert metric_info("ppl_wikitext2").label == "WikiText-2"
    assert metric_info("ppl_lambada_openai").table == "word_perplexity"   # not a GPTQ ppl
    assert metric_info("acc_arc_easy").higher_is_better
    assert metric_info("mmlu_stem").stderr == "mmlu_stem_stderr"


def test_ppl_plot_splits_main_methods_ablations_and_libraries(tmp_path):
    from harness.results import plots as P

    store = ResultStore(tmp_path / "runs")
    dyn = {"act_mode": "dynamic_token"}
    runs = [("fp16", "w16a16", {}), ("rtn", "w4a16", dyn), ("rtn", "w8a8", dyn),
            ("rtn", "w4a8", {"act_mode": "static_tensor"}), ("gptq", "w4a16", {}),
            ("llmc_gptq", "w4a16", {})]
    for i, (method, bits, extra) in enumerate(runs):
        rec = _rec(i, "m", method, bits, cfg_hash=f"h{i}", metrics={"ppl_wikitext2": 10.0 + i})
        rec.config["method"].update(extra)
        store.write(rec)
    df = records_frame(store).sort_values("run_id")
    assert [P.ppl_figure_of(m, v) for m, v in zip(df["method"], df["variant"], strict=True)
            ] == ["main", "main", "main", "ablations", "main", "libraries"]
    figs = P.plot_ppl_vs_bits(df, tmp_path / "ppl_vs_bits")
    assert sorted(figs) == ["ppl_vs_bits", "ppl_vs_bits_ablations", "ppl_vs_bits_libraries"]
    assert all(p.is_file() for paths in figs.values() for p in paths)
    labels = sorted(set(df["method"]))
    styles = P._series_styles(labels)
    assert len(set(styles.values())) == len(labels)      # distinct colour + marker per series
