"""Dataset resolution: data directory -> installed package -> hub, with clear errors.

The data directory is `paths.data_dir` (default: ../shared/data beside the checkout
when it exists), overridden by the PTQBENCH_DATA_DIR environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PTQBENCH_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


class DataMissingError(FileNotFoundError):
    """A dataset file is missing; the message names the file and how to provide it."""


def resolve_data_dir(configured: str | os.PathLike | None = None) -> Path | None:
    """PTQBENCH_DATA_DIR > configured path > ../shared/data beside the repo; None if absent."""
    for cand in (os.environ.get(ENV_VAR), configured, REPO_ROOT.parent / "shared" / "data"):
        if cand:
            path = Path(cand).expanduser()
            if not path.is_absolute():
                path = (REPO_ROOT / path).resolve()
            if path.is_dir():
                return path
    return None


def require_file(data_dir: Path | None, relative: str, what: str) -> Path:
    """Path of `relative` inside the data directory, or a DataMissingError saying how to fix."""
    if data_dir is None:
        raise DataMissingError(
            f"{what} needs the data directory, which was not found. Set paths.data_dir=... "
            f"or {ENV_VAR}=/path/to/data (expected file: <data_dir>/{relative}); "
            "or set data.source=hub when online.")
    path = data_dir / relative
    if not path.is_file():
        raise DataMissingError(
            f"{what}: missing file {path}. Put it there (see the data MANIFEST for its "
            f"format) or point {ENV_VAR} / paths.data_dir at a directory that has it.")
    return path
