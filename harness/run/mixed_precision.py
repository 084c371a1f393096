"""Mixed precision in the pipeline: top-k sensitive groups -> keep_fp, and the size record.

    method.keep_top_k_sensitive=3 method.sensitivity_from=<record JSON path | run id>

reads the ranked table a `eval=sensitivity` run stored (artifacts["sensitivity"]), takes
the k groups of kind `method.sensitivity_groups` (block | type | sublayer) with the
largest perplexity increase, and appends their name patterns to keep_fp before the method
config is built, so the method itself only ever sees keep_fp.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from harness.results.store import CorruptRecord, ResultStore, RunRecord, read_record
from methods.arch import ModelSpec
from methods.base import Method
from methods.size import model_size

log = logging.getLogger(__name__)

SELECTION_KEYS = ("keep_top_k_sensitive", "sensitivity_from", "sensitivity_groups")
GROUP_KINDS = ("block", "type", "sublayer")


class SensitivityRecordError(ValueError):
    """The sensitivity record asked for cannot be used; the message says what to do."""


def find_sensitivity_record(ref: str, runs_dir: str | Path | None) -> dict[str, Any]:
    path = Path(ref).expanduser()
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise SensitivityRecordError(f"sensitivity record {path} does not exist")
        return read_record(path)
    if runs_dir is None:
        raise SensitivityRecordError(f"run id {ref!r} given but no runs directory is known")
    candidate = Path(runs_dir) / f"{ref}.json"
    if candidate.is_file():
        return read_record(candidate)
    found = [r for r in ResultStore(runs_dir).records() if r["run_id"].startswith(ref)]
    if len(found) != 1:
        what = "no record" if not found else f"{len(found)} records"
        raise SensitivityRecordError(
            f"{what} in {runs_dir} with run id {ref!r}; give the record's JSON path or its "
            "full run id (ls <results>/runs) in method.sensitivity_from")
    return found[0]


def top_k_sensitive(record: dict[str, Any], k: int, kind: str) -> list[dict[str, Any]]:
    """The k groups of `kind` ranked most harmful by the record (its eval's rank_by)."""
    if kind not in GROUP_KINDS:
        raise SensitivityRecordError(f"method.sensitivity_groups={kind!r}; use one of "
                                     f"{GROUP_KINDS}")
    table = record.get("artifacts", {}).get("sensitivity")
    if not table:
        raise SensitivityRecordError(
            f"record {record.get('run_id')} has no sensitivity table; run it with "
            "eval=sensitivity first")
    rows = sorted((r for r in table if r["kind"] == kind), key=lambda r: r["rank"])
    if k > len(rows):
        raise SensitivityRecordError(f"keep_top_k_sensitive={k} but the record ranks only "
                                     f"{len(rows)} groups of kind {kind!r}")
    return rows[:k]


def resolve_selection(node: dict[str, Any], runs_dir: str | Path | None) -> dict[str, Any]:
    """Pop the selection keys from a method config node; extend its keep_fp in place.
    Returns what was selected (empty when no selection was asked for)."""
    k = int(node.pop("keep_top_k_sensitive", 0) or 0)
    source = node.pop("sensitivity_from", None)
    kind = node.pop("sensitivity_groups", None) or "block"
    if k <= 0:
        return {}
    if not source:
        raise SensitivityRecordError(
            "method.keep_top_k_sensitive needs method.sensitivity_from=<record JSON or run id> "
            "of an eval=sensitivity run")
    try:
        record = find_sensitivity_record(str(source), runs_dir)
    except CorruptRecord as e:
        raise SensitivityRecordError(f"sensitivity record unreadable: {e}") from e
    chosen = top_k_sensitive(record, k, kind)
    patterns = [p for r in chosen for p in r["patterns"]]
    node["keep_fp"] = [*(node.get("keep_fp") or []), *patterns]
    log.info("keeping the %d most sensitive %s groups in full precision: %s", k, kind,
             [r["group"] for r in chosen])
    return {"sensitivity_record": record["run_id"], "top_k": k, "group_kind": kind,
            "groups": [r["group"] for r in chosen], "patterns": patterns}


def record_size_and_precision(record: RunRecord, model: nn.Module, spec: ModelSpec,
                              method: Method, selection: dict[str, Any] | None = None) -> None:
    """metrics.model_size_bytes / avg_bits_per_weight / avg_bits_linear and
    provenance.mixed_precision (patterns asked for, linears kept, sensitivity selection)."""
    size = model_size(model, spec, method.config)
    record.metrics.update(size.metrics())
    record.provenance["mixed_precision"] = {
        "keep_fp": list(method.config.keep_fp), "keep_w8": list(method.config.keep_w8),
        **size.mixed_precision(), **({"selection": selection} if selection else {})}
