"""Table -> markdown, LaTeX (booktabs) or CSV text."""

from __future__ import annotations

import csv
import io

from harness.results.tables import Cell, Table


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
