"""Table -> markdown, LaTeX (booktabs) or CSV text."""

from __future__ import annotations

import csv
import io

from harness.results.tables import Cell, Table

MAX_MD_COLUMNS = 12


def column_blocks(t: Table, max_cols: int = MAX_MD_COLUMNS) -> list[list[int]]:
    """Column indices of each markdown block: the label columns, then as many data columns
    as fit in `max_cols` (a "Δ x" column stays with its x, a `column_group` stays whole)."""
    labels = list(range(t.n_label_cols))
    groups: list[list[int]] = []
    for j in range(t.n_label_cols, len(t.columns)):
        if groups and (t.columns[j] == f"Δ {t.columns[groups[-1][0]]}"
                       or len(groups[-1]) < t.column_group):
            groups[-1].append(j)
        else:
            groups.append([j])
    room = max(max_cols - len(labels), 2)
    blocks: list[list[int]] = []
    for g in groups:
        if blocks and len(blocks[-1]) + len(g) <= room:
            blocks[-1] += g
        else:
            blocks.append(list(g))
    return [labels + b for b in blocks] or [labels]


def to_markdown(t: Table, max_cols: int = MAX_MD_COLUMNS) -> str:
    """Markdown; a table wider than `max_cols` is split into blocks that repeat the row
    labels (CSV and LaTeX keep the full width)."""
    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|")
        return f"**{text}**" if c.bold else text
    if t.empty:
        return f"_{t.title}: no runs._\n"
    lines: list[str] = []
    for block in column_blocks(t, max_cols):
        if lines:
            lines.append("")
        lines += ["| " + " | ".join(t.columns[j].replace("|", "\\|") for j in block) + " |",
                  "|" + "|".join(":--" if j < t.n_label_cols else "--:" for j in block) + "|"]
        lines += ["| " + " | ".join(cell(row[j]) for j in block) + " |" for row in t.rows]
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
