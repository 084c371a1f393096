"""`ptqbench-report`: run records -> reports/<name>/ (report.md, tables/*.csv|tex, plots/).

    ptqbench-report --runs results/runs --model smollm2-135m --name smollm2-135m
    ptqbench-report --runs results/runs --model smollm2-135m --eval ppl-quick --print
    ptqbench-report --runs results/runs --model smollm2-135m --print --show-skipped
    ptqbench-report --runs results/runs --export results.parquet

Skipped and failed jobs are one line under the report's header unless --show-skipped; the
same records always give the same files (no generation time, no random SVG ids).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import uuid
from pathlib import Path

import pandas as pd

from harness.results.alignment import alignment_table
from harness.results.paper_tables import (
    accuracy_table,
    cost_table,
    exports_table,
    fptq_policy_table,
    latency_table,
    mmlu_table,
    perplexity_table,
    perplexity_wide_table,
    superseded_table,
)
from harness.results.records import (
    filter_runs,
    latest_per_config,
    records_frame,
    with_method_label,
)
from harness.results.render import to_csv, to_latex, to_markdown
from harness.results.reproduction import load_references, reproduction_table
from harness.results.store import ResultStore
from harness.results.tables import MEASURED, Table, comparison_table
from harness.util.security import UnsafePathError, safe_name, within_root

log = logging.getLogger("ptqbench.report")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCES = REPO / "reports" / "reference"


def slug(value: object) -> str:
    """A record field (model, bits, method label) as a plain file-name component."""
    text = re.sub(r"[^A-Za-z0-9.=+-]+", "_", str(value)).strip("._") or "x"
    return safe_name(text.replace("..", "_"), "report file name")


def inside(root: Path, *parts: str) -> Path:
    """root/parts..., each part a safe name, the result checked to stay inside root."""
    for part in parts:
        safe_name(part, "report file name")
    return within_root(root, Path(root).joinpath(*parts), "report output")


def remove_stale(folder: Path, written: set[str]) -> None:
    """Delete the tables / plots a previous run of this report wrote and this one did not
    (e.g. `superseded.csv` once no record is superseded): a stale file would be read as
    current."""
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and f.suffix in (".csv", ".tex", ".png", ".svg") and f.name not in written:
                f.unlink()


def write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def hide_not_ok(df: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Drop configs whose latest record is skipped or failed; the one line that says so
    (what the report prints instead of a row per such job, unless --show-skipped)."""
    latest = latest_per_config(df)
    bad = latest[~latest["status"].isin(MEASURED)]     # partial records keep their row
    if bad.empty:
        return df, None
    counts = ", ".join(f"{n} {status}" for status, n in sorted(bad["status"].value_counts().items()))
    return (df[~df["config_hash"].isin(bad["config_hash"])],
            f"Not shown: {counts} jobs (`ptqbench-report --show-skipped` lists them with "
            "their reasons).")


def build_tables(df: pd.DataFrame, refs: pd.DataFrame, shown: pd.DataFrame | None = None
                 ) -> list[Table]:
    """The report's tables from `shown` (default: all of df); superseded runs from df."""
    ok_or_bad = latest_per_config(df if shown is None else shown)
    return [perplexity_table(ok_or_bad), perplexity_wide_table(ok_or_bad),
            accuracy_table(ok_or_bad), mmlu_table(ok_or_bad), latency_table(ok_or_bad),
            cost_table(ok_or_bad), fptq_policy_table(ok_or_bad), exports_table(ok_or_bad),
            alignment_table(ok_or_bad), reproduction_table(ok_or_bad, refs),
            superseded_table(df)]


def build_plots(df: pd.DataFrame, plot_dir: Path, bench_dir: Path | None) -> dict[str, list[Path]]:
    """Plots under plot_dir; every file name built from record fields goes through slug /
    inside (a record with model '../../x' writes nowhere but plot_dir)."""
    from harness.results import plots as P

    out = {**P.plot_ppl_vs_bits(df, inside(plot_dir, "ppl_vs_bits")),
           "accuracy_vs_latency": P.plot_accuracy_vs_latency(
               df, inside(plot_dir, "accuracy_vs_latency")),
           "cost": P.plot_cost(df, inside(plot_dir, "cost"))}
    if "fptq_policy" in df.columns:
        latest = with_method_label(latest_per_config(df[df["status"] == "ok"]))
        for _, r in latest.iterrows():
            if isinstance(r["fptq_policy"], list) and r["fptq_policy"]:
                name = slug(f"fptq_policy_{r['model']}_{r['bits']}_{r['method_label']}")
                out[name] = P.plot_fptq_policy(
                    r["fptq_policy"], inside(plot_dir, name),
                    P.fptq_thresholds(r.get("method_cfg")),
                    title=f"FPTQ policy: {r['model']} {r['bits']} {r['method_label']}")
    for stem, result in P.load_bench(bench_dir) if bench_dir else []:
        name = slug(f"kernel_speedup_{stem}")
        out[name] = P.plot_kernel_speedup(result, inside(plot_dir, name))
    return {k: v for k, v in out.items() if v}


def render_report(name: str, tables: list[Table], plots: dict[str, list[Path]],
                  out_dir: Path, args: argparse.Namespace, n_records: int,
                  corrupt: list[str], newest: str = "", hidden: str | None = None) -> str:
    """report.md: only sections with data; the same records give the same text (no
    generation time: `newest` is the latest record's finish time)."""
    filters = {k: getattr(args, k) for k in ("model", "method", "bits", "eval", "sweep", "since",
                                             "until") if getattr(args, k)}
    lines = [f"# ptqbench report: {name}", "",
             f"From `{args.runs}` ({n_records} records, newest finished {newest}"
             + (f"; filters {filters}" if filters else "") + "). Latest record per config "
             "hash; older ones are listed under *Superseded runs*. Records that differ in a "
             "setting that can change a number are separate rows (Setting column). Bold: "
             "best per column among quantized methods; Δ: difference to the fp16 row of the "
             "same model at the same settings.", ""]
    if hidden:
        lines += [hidden, ""]
    if corrupt:
        lines += ["**Unreadable record files (skipped):**", ""]
        lines += [f"- `{c}`" for c in corrupt] + [""]
    plot_after = {"perplexity": ["ppl_vs_bits", "ppl_vs_bits_ablations", "ppl_vs_bits_libraries"], "accuracy": ["accuracy_vs_latency"],
                  "cost": ["cost"], "fptq_policy": [k for k in plots if k.startswith("fptq_")]}
    for t in (t for t in tables if not t.empty):
        lines += [f"## {t.title}", ""]
        lines.append(to_markdown(t))
        lines.append(f"Files: [csv](tables/{t.name}.csv), [tex](tables/{t.name}.tex)\n")
        for key in plot_after.get(t.name, []):
            if key in plots:
                lines += [f"![{key}](plots/{key}.png)", ""]
    bench = [k for k in plots if k.startswith("kernel_speedup_")]
    if bench:
        lines += ["## Kernel speedup vs M", ""]
        lines += [f"![{k}](plots/{k}.png)\n" for k in bench]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ptqbench-report", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--runs", default="results/runs", help="directory of run records")
    for flag, what in (("model", "models"), ("method", "methods"), ("bits", "bit widths"),
                       ("eval", "eval configs"), ("sweep", "sweep labels")):
        ap.add_argument(f"--{flag}", action="append", help=f"keep only these {what} (repeatable)")
    ap.add_argument("--since", help="keep records finished at/after this time (ISO, UTC)")
    ap.add_argument("--until", help="keep records finished at/before this time (ISO, UTC)")
    ap.add_argument("--name", help="report name: writes reports/<name>/ (default: the models)")
    ap.add_argument("--out-root", default="reports", help="parent directory of reports")
    ap.add_argument("--references", default=str(DEFAULT_REFERENCES),
                    help="directory of published-number CSVs")
    ap.add_argument("--bench", default="results/bench", help="kernels/bench.py JSON directory")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--print", action="store_true",
                    help="print the quick markdown comparison table to stdout (writes nothing "
                         "unless --name is given)")
    ap.add_argument("--show-skipped", action="store_true",
                    help="list skipped / failed jobs in the tables (default: one line)")
    ap.add_argument("--export", help="also write all (unfiltered) records to this parquet file")
    return ap.parse_args(argv)


def input_errors(args: argparse.Namespace) -> list[str]:
    """Paths given on the command line that cannot be what they are meant to be: a wrong
    --references or --bench would silently drop a table, a directory for --export would
    fail after the work."""
    errors = []
    if not Path(args.runs).is_dir():
        errors.append(f"--runs {args.runs} is not a directory (give the results/runs "
                      "directory ptqbench writes)")
    for flag, given, default in (("--references", args.references, str(DEFAULT_REFERENCES)),
                                 ("--bench", args.bench, "results/bench")):
        if given != default and not Path(given).is_dir():
            errors.append(f"{flag} {given} is not a directory")
    if args.export and (Path(args.export).suffix != ".parquet" or Path(args.export).is_dir()):
        errors.append(f"--export {args.export}: give a file name ending in .parquet")
    return errors


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    errors = input_errors(args)
    for e in errors:
        print(f"ptqbench-report: {e}", file=sys.stderr)
    if errors:
        return 2
    store = ResultStore(args.runs)
    if args.export:
        try:
            path = store.export_parquet(args.export)
        except ImportError as e:
            print(f"--export needs pyarrow: pip install pyarrow ({e})", file=sys.stderr)
            return 2
        print(f"exported {args.runs} -> {path}")
    df = records_frame(store)
    if df.empty:
        print(f"no records under {args.runs}: run `ptqbench ...` first or point --runs at a "
              "results/runs directory", file=sys.stderr)
        return 1
    try:
        df = filter_runs(df, args.model, args.method, args.bits, args.eval, args.sweep,
                           args.since, args.until)
    except ValueError as e:
        print(f"bad --since/--until: {e}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"no records under {args.runs} match the filters", file=sys.stderr)
        return 1
    if args.name:
        try:
            safe_name(args.name, "--name")
        except UnsafePathError as e:     # before anything is written
            print(f"ptqbench-report: {e}", file=sys.stderr)
            return 2
    shown, hidden = (df, None) if args.show_skipped else hide_not_ok(df)
    if args.print:
        print(comparison_table(shown, delta=True).to_markdown(index=False, disable_numparse=True))
        policy = fptq_policy_table(shown)
        if not policy.empty:
            print(f"\n{policy.title}\n\n{to_markdown(policy)}")
        print(f"\n{len(df)} records in {args.runs}" +
              (f"; {len(store.corrupt)} corrupt files skipped" if store.corrupt else ""))
        if hidden:
            print(hidden)
        if not args.name:
            return 0
    try:
        name = (safe_name(args.name, "--name") if args.name
                else slug("-".join(sorted(map(str, df["model"].unique())))[:120]))
        out_dir = inside(Path(args.out_root), name)
        out_dir.mkdir(parents=True, exist_ok=True)
    except UnsafePathError as e:
        print(f"ptqbench-report: {e}", file=sys.stderr)
        return 2
    except OSError as e:           # before any table is built
        print(f"ptqbench-report: cannot write the report under --out-root {args.out_root}: "
              f"{e.strerror or e}; give a writable directory", file=sys.stderr)
        return 2
    refs = load_references(args.references)
    tables = build_tables(df, refs, shown)
    written = {write_atomic(inside(out_dir, "tables", f"{t.name}.{ext}"), render(t)).name
               for t in tables if not t.empty
               for ext, render in (("csv", to_csv), ("tex", to_latex))}
    plots = {} if args.no_plots else build_plots(shown, out_dir / "plots", Path(args.bench))
    remove_stale(out_dir / "tables", written)
    if not args.no_plots:
        remove_stale(out_dir / "plots", {p.name for ps in plots.values() for p in ps})
    newest = pd.Timestamp(df["finished_at"].max()).isoformat(timespec="seconds")
    write_atomic(inside(out_dir, "report.md"),
                 render_report(name, tables, plots, out_dir, args, len(df), store.corrupt,
                               newest, hidden))
    print(f"wrote {out_dir / 'report.md'} ({sum(not t.empty for t in tables)} tables, "
          f"{len(plots)} plots): the full report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
