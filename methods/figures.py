"""Saving method figures (matplotlib, Agg backend selected by the caller)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write `fig` to `path` atomically (tmp file + rename) and close it.

    The format comes from the suffix (png when there is none); parent folders are created.
    """
    import matplotlib.pyplot as plt

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
