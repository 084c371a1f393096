"""Experiment tracking. `tracking: none` (default) is a no-op."""

from __future__ import annotations

from typing import Any


class NullTracker:
    def finish(self, record: Any) -> None:
        pass


def make_tracker(cfg: Any, record: Any):
    kind = None if cfg is None else cfg.get("kind", "none")
    if kind in (None, "none"):
        return NullTracker()
    raise ValueError(f"unknown tracking.kind {kind!r}; use none or wandb")
