"""Experiment tracking. `tracking: none` (default) is a no-op; `tracking: wandb` opens one W&B
run per job (offline with mode=offline or WANDB_MODE=offline; `wandb sync <dir>` later).

The W&B run gets the resolved config (the record's config: it never holds secrets), the
metrics, timings and memory, the FPTQ per-layer policy as a wandb.Table and its plot as an
image. Everything W&B writes lands under `<dir>/<run_id>/`, inside the run's artifacts dir.
The API key is read by wandb from its own environment and never copied anywhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from harness.results.records import policy_rows

log = logging.getLogger(__name__)
# wandb's own config/cache/artifact dirs default to ~/.config/wandb, ~/.cache/wandb: keep
# them in the run dir unless the user chose otherwise.
_WANDB_DIR_ENV = {"WANDB_CONFIG_DIR": "wandb-config", "WANDB_CACHE_DIR": "wandb-cache",
                  "WANDB_DATA_DIR": "wandb-data", "WANDB_ARTIFACT_DIR": "wandb-artifacts"}


class NullTracker:
    def finish(self, record: Any) -> None:
        pass


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    try:
        v = cfg.get(key, default)
    except AttributeError:
        return default
    return default if v is None else v


class WandbTracker:
    """One W&B run per job; opened at make_tracker, closed (metrics logged) at finish."""

    def __init__(self, cfg: Any, record: Any):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("tracking=wandb needs wandb: pip install 'ptqbench[tracking]'") from e
        self.wandb = wandb
        self.run_dir = Path(str(_get(cfg, "dir", "results/artifacts"))) / record.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for var, sub in _WANDB_DIR_ENV.items():
            os.environ.setdefault(var, str((self.run_dir / sub).resolve()))
        mode = str(_get(cfg, "mode", "online"))
        mode = os.environ.get("WANDB_MODE", mode)
        tags = [str(t) for t in (_get(cfg, "tags", None) or [record.model, record.bits])]
        self.run = wandb.init(
            project=str(_get(cfg, "project", "ptqbench")),
            entity=_get(cfg, "entity", None),
            mode=mode,
            group=_get(cfg, "group", None) or record.sweep,
            job_type=_get(cfg, "job_type", None) or record.method,
            tags=tags,
            name=f"{record.model}/{record.method}/{record.bits}/{record.eval}",
            id=record.run_id.replace(":", "-")[:64],
            dir=str(self.run_dir),
            config=record.config,
            reinit="finish_previous",
        )
        log.info("wandb run %s (%s) in %s", self.run.id, mode, self.run_dir)

    def finish(self, record: Any) -> None:
        wandb = self.wandb
        try:
            data: dict[str, Any] = dict(record.metrics)
            data.update({f"time/{k}": v for k, v in record.timings.items()})
            data.update({f"memory/{k}": v for k, v in record.memory.items()})
            policy = policy_rows((record.artifacts or {}).get("fptq_policy"))
            if isinstance(policy, list) and policy:
                cols = sorted({k for row in policy for k in row})
                data["fptq_policy"] = wandb.Table(
                    columns=cols, data=[[row.get(c) for c in cols] for row in policy])
            for png in sorted(self.run_dir.glob("*.png")):
                data[f"plots/{png.stem}"] = wandb.Image(str(png))
            if data:
                self.run.log(data)
            self.run.summary["status"] = record.status
            if record.error:
                self.run.summary["error"] = record.error
        finally:
            self.run.finish(exit_code=0 if record.status != "failed" else 1)


class _Guarded:
    """A tracker whose finish errors are logged, never raised (the record is written)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def finish(self, record: Any) -> None:
        try:
            self.inner.finish(record)
        except Exception as e:  # noqa: BLE001
            log.error("tracking finish failed: %s: %s", type(e).__name__, e)


def make_tracker(cfg: Any, record: Any):
    kind = None if cfg is None else cfg.get("kind", "none")
    if kind in (None, "none"):
        return NullTracker()
    if kind == "wandb":
        try:
            return _Guarded(WandbTracker(cfg, record))
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - tracking must never cost the run its record
            log.error("wandb init failed (%s: %s); this run is not tracked", type(e).__name__, e)
            return NullTracker()
    raise ValueError(f"unknown tracking.kind {kind!r}; use none or wandb")
