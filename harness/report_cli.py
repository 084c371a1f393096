"""`ptqbench-report`: store -> tables."""

from __future__ import annotations

import argparse
import sys

from harness.report import comparison_table
from harness.store import ResultStore


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ptqbench-report", description=__doc__)
    ap.add_argument("--runs", default="results/runs", help="directory of run records")
    ap.add_argument("--model", action="append", help="keep only these models")
    ap.add_argument("--eval", action="append", help="keep only these eval configs")
    ap.add_argument("--print", action="store_true", help="print the comparison table")
    args = ap.parse_args(argv)
    store = ResultStore(args.runs)
    df = store.load()
    if df.empty:
        print(f"no records under {args.runs}", file=sys.stderr)
        return 1
    for col, keep in (("model", args.model), ("eval", args.eval)):
        if keep:
            df = df[df[col].isin(keep)]
    table = comparison_table(df)
    print(table.to_markdown(index=False))
    print(f"\n{len(df)} records in {args.runs}" +
          (f"; {len(store.corrupt)} corrupt files skipped" if store.corrupt else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
