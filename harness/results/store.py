"""Results store: one immutable JSON record per job, written atomically.

Layout: <root>/<run_id>.json. A record is written to a unique temporary name in the
same directory, fsynced, then renamed into place, so readers never see a partial file
and concurrent writers (Slurm array tasks on a shared file system) never collide:
run ids carry a timestamp, the config hash and a random suffix. Records are never
rewritten; a rerun adds a newer record and readers take the latest per config hash.

Hardening: the temp file is hard-linked to its final name (fails instead of overwriting
if the name exists) and falls back to an exclusive create where the file system has no
hard links; the directory is fsynced so a crash after write() cannot lose the name;
record names are checked to be plain file names and symlinks in the root are neither
written through nor read (they could point outside it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from harness.util.fsutil import fsync_dir

log = logging.getLogger(__name__)

# ok: every evaluation ran. partial: some evaluations failed (record.provenance.eval_errors
# says which and why); interrupted: SIGINT/SIGTERM stopped the job. Resume reruns every
# status but ok and skipped (and failed only with rerun_failed).
Status = Literal["ok", "partial", "failed", "skipped", "interrupted"]
STATUSES = ("ok", "partial", "failed", "skipped", "interrupted")
DONE_STATUSES = ("ok", "skipped")
SCHEMA_VERSION = 1
# Config keys that change where or how results are written, not what is measured.
NON_IDENTITY_KEYS = ("paths", "launcher", "tracking", "force", "rerun_failed", "sweep", "jobs",
                     "hydra", "cache", "save_checkpoint", "export", "placement")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
# Hard links unsupported (some network / FUSE file systems): fall back to exclusive create.
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def config_hash(cfg: dict[str, Any]) -> str:
    blob = json.dumps(cfg, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def identity_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that can change a number (hashed into config_hash)."""
    return {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}


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


# field -> allowed JSON types (None allowed where listed); checked on every read so a
# hand-edited or foreign file is named and skipped instead of crashing a report.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,), "config_hash": (str,), "status": (str,), "model": (str,),
    "method": (str,), "bits": (str,), "eval": (str,), "config": (dict,), "metrics": (dict,),
    "timings": (dict,), "memory": (dict,), "provenance": (dict,), "artifacts": (dict,),
    "error": (str, type(None)), "sweep": (str, type(None)), "started_at": (str, type(None)),
    "finished_at": (str, type(None)), "schema": (int,),
}
_REQUIRED = ("run_id", "config_hash", "status", "model", "method", "bits", "eval")


def validate_record(data: Any, where: str) -> dict[str, Any]:
    """`data` if it is a run record with fields of the right types; CorruptRecord naming
    `where` and the first bad field otherwise."""
    if not isinstance(data, dict):
        raise CorruptRecord(f"{where}: not a run record (a JSON {type(data).__name__}, "
                            "expected an object)")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CorruptRecord(f"{where}: not a run record (missing {missing})")
    for key, types in _FIELD_TYPES.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            raise CorruptRecord(f"{where}: field {key!r} is {type(data[key]).__name__} "
                                f"{str(data[key])[:60]!r}; expected "
                                f"{' or '.join(t.__name__ for t in types)}")
    if data["status"] not in STATUSES:
        raise CorruptRecord(f"{where}: status {data['status']!r} is not one of {STATUSES}")
    if not _RUN_ID.match(data["run_id"]):
        raise CorruptRecord(f"{where}: run_id {data['run_id'][:60]!r} is not a plain name")
    for group in ("metrics", "timings", "memory"):
        bad = [k for k, v in (data.get(group) or {}).items()
               if group != "metrics" and not _is_number(v)]
        if bad:
            raise CorruptRecord(f"{where}: {group} {bad[:3]} are not numbers")
    return data


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptRecord(f"{path}: {e}") from e
    return validate_record(data, str(path))


def _write_new(path: Path, payload: bytes) -> None:
    """Create `path` (never an existing file, never through a symlink), write, fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(path)
        raise


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding mixed types (e.g. a metric that is a float in one record and
    a dict in another) become JSON text so Arrow can store them."""
    out = df.copy()
    for col in out.select_dtypes(include="object").columns:
        vals = out[col].dropna()
        if not vals.map(lambda v: isinstance(v, str)).all():
            out[col] = out[col].map(lambda v: v if v is None or isinstance(v, str)
                                    else json.dumps(v, default=str))
    return out


class ResultStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.corrupt: list[str] = []

    def write(self, record: RunRecord) -> Path:
        if not _RUN_ID.match(str(record.run_id)):
            raise ValueError(f"run_id {record.run_id!r} is not a plain file name")
        self.root.mkdir(parents=True, exist_ok=True)
        record.finished_at = record.finished_at or _utcnow()
        final = self.root / f"{record.run_id}.json"
        if os.path.lexists(final):
            raise FileExistsError(f"record {final} exists; records are never overwritten")
        payload = record.to_json().encode("utf-8")
        tmp = self.root / f".{record.run_id}.{uuid.uuid4().hex}.tmp"
        try:
            _write_new(tmp, payload)
            try:
                os.link(tmp, final, follow_symlinks=False)   # atomic, never overwrites
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                _write_new(final, payload)   # no hard links here: exclusive create + fsync
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        fsync_dir(self.root)
        return final

    def paths(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*.json")
                      if not p.name.startswith(".") and not p.is_symlink())

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

    # ------------------------------------------------------------ consolidation

    RECORD_COLUMN = "record_json"

    def export_parquet(self, path: str | os.PathLike) -> Path:
        """All records in one Parquet file: the flattened `load()` frame plus a
        `record_json` column with each full record. Written atomically."""
        path = Path(path)
        by_id = {r["run_id"]: r for r in self.records()}
        df = self.load()
        if df.empty:
            df = pd.DataFrame(columns=["run_id", "config_hash", "status"])
        df[self.RECORD_COLUMN] = [json.dumps(by_id[i], sort_keys=True, default=str)
                                  for i in df["run_id"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            _parquet_safe(df).to_parquet(tmp, index=False)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        log.info("exported %d records to %s", len(df), path)
        return path

    @classmethod
    def from_parquet(cls, path: str | os.PathLike) -> pd.DataFrame:
        """The frame `export_parquet` wrote (json.loads(row.record_json) is the record)."""
        return pd.read_parquet(path)
