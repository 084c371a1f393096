"""Results store: one immutable JSON record per job, written atomically.

Layout: <root>/<run_id>.json. A record is written to a unique temporary name in the
same directory, fsynced, then renamed into place, so readers never see a partial file
and concurrent writers (Slurm array tasks on a shared file system) never collide:
run ids carry a timestamp, the config hash and a random suffix. Records are never
rewritten; a rerun adds a newer record and readers take the latest per config hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd

log = logging.getLogger(__name__)

Status = Literal["ok", "failed", "skipped"]
SCHEMA_VERSION = 1


def config_hash(cfg: dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(cfg_hash: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{cfg_hash[:10]}-{uuid.uuid4().hex[:8]}"


def finite_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """Drop NaN/inf (never stored as numbers); return the names dropped."""
    kept, dropped = {}, []
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped


@dataclass
class RunRecord:
    run_id: str
    config_hash: str
    status: Status
    model: str
    method: str
    bits: str
    eval: str
    config: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    sweep: str | None = None
    started_at: str = field(default_factory=_utcnow)
    finished_at: str | None = None
    schema: int = SCHEMA_VERSION

    def to_json(self) -> str:
        metrics, dropped = finite_metrics(self.metrics)
        data = asdict(self)
        data["metrics"] = metrics
        if dropped:
            data["provenance"] = {**self.provenance, "non_finite_metrics": dropped}
        return json.dumps(data, indent=1, sort_keys=False, default=str, allow_nan=False)


class CorruptRecord(ValueError):
    pass


def read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRecord(f"{path}: {e}") from e
    missing = {"run_id", "config_hash", "status"} - set(data) if isinstance(data, dict) else {"*"}
    if missing:
        raise CorruptRecord(f"{path}: not a run record (missing {sorted(missing)})")
    return data


class ResultStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.corrupt: list[str] = []

    def write(self, record: RunRecord) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        record.finished_at = record.finished_at or _utcnow()
        final = self.root / f"{record.run_id}.json"
        if final.exists():
            raise FileExistsError(f"record {final} exists; records are never overwritten")
        tmp = self.root / f".{record.run_id}.{uuid.uuid4().hex}.tmp"
        payload = record.to_json()
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final

    def paths(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*.json") if not p.name.startswith("."))

    def records(self) -> list[dict[str, Any]]:
        """All readable records; corrupt files are reported in self.corrupt and left alone."""
        out, self.corrupt = [], []
        for p in self.paths():
            try:
                out.append(read_record(p))
            except CorruptRecord as e:
                self.corrupt.append(str(e))
                log.warning("skipping corrupt record %s", e)
        return out

    def find(self, cfg_hash: str, status: Status | None = "ok") -> list[dict[str, Any]]:
        return [r for r in self.records()
                if r["config_hash"] == cfg_hash and (status is None or r["status"] == status)]

    def load(self) -> pd.DataFrame:
        """One row per record; metrics as columns, timings as time_<phase>,
        memory as mem_<name>."""
        rows = []
        for r in self.records():
            row = {k: r.get(k) for k in ("run_id", "config_hash", "status", "model", "method",
                                          "bits", "eval", "sweep", "error", "started_at",
                                          "finished_at")}
            row.update(r.get("metrics", {}))
            row.update({f"time_{k}": v for k, v in r.get("timings", {}).items()})
            row.update({f"mem_{k}": v for k, v in r.get("memory", {}).items()})
            prov = r.get("provenance", {})
            row["device"] = prov.get("device_name")
            row["git_sha"] = prov.get("git_sha")
            rows.append(row)
        df = pd.DataFrame(rows)
        if not df.empty:
            for col in ("started_at", "finished_at"):
                df[col] = pd.to_datetime(df[col], utc=True, errors="coerce")
            df = df.sort_values("finished_at", kind="stable").reset_index(drop=True)
        return df

    def export_parquet(self, path: str | os.PathLike) -> Path:
        """All records (load() layout) to one parquet file, written atomically; needs pyarrow."""
        df = self.load()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path
