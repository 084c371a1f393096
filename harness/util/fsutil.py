"""Small durability helpers shared by the run store, the quantized-model cache and the
converted-model copies."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a new directory entry (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StagedDir:
    """A temp directory beside `final`, published as `final` with one rename.

        with StagedDir(final) as stage:
            write files into stage.path          # the last one written marks completeness
        stage.published   # False: `final` already existed (another job wrote it): kept

    Readers never see a half-written `final`; the temp dir is removed on every exit path.
    Temp names start with `.tmp-` so a sweeper can remove ones left by killed writers.
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.path = self.final.parent / f".tmp-{self.final.name}-{uuid.uuid4().hex}"
        self.published = False

    def __enter__(self) -> StagedDir:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                fsync_dir(self.path)
                try:
                    os.rename(self.path, self.final)
                    self.published = True
                except OSError:
                    if not self.final.exists():
                        raise
                fsync_dir(self.final.parent)
        finally:
            if self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
