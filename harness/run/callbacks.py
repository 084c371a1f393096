"""Hydra callbacks: the end-of-sweep summary, and the launcher-plugin check.

Jobs may run in other processes or on other nodes (joblib, submitit), so nothing is
counted in memory: each job writes `job_status.json` into its own Hydra output directory
(`write_job_status`), and `SweepSummary.on_multirun_end` reads them back from the sweep
directory. A job killed before it finished has no status file and counts as `missing`;
the next run of the same sweep command reruns it.

While a sweep runs (basic launcher: in this process), each finished job logs the progress
(job i of N, elapsed, estimated time left); the sweep ends with a table of every job's
outcome and headline metrics, then the counts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.run.jobs import job_list
from harness.util.security import override_secrets, scrub_tree

log = logging.getLogger("ptqbench.sweep")

JOB_STATUS_FILE = "job_status.json"
SUMMARY_FILE = "sweep_summary.json"
OUTCOMES = ("ok", "failed", "skipped", "resumed", "missing")

# launcher config name -> (Hydra plugin module, pip package)
LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
}


def job_outcome(status: str, resumed: bool) -> str:
    return "resumed" if resumed else status


# report tables whose metrics the end-of-sweep table shows (MMLU: its average only)
HEADLINE_TABLES = ("perplexity", "accuracy_avg", "mmlu")


def headline_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    """{label: formatted value} of a record's headline metrics, as their evaluators label them."""
    from harness.evals import metric_info

    out = {}
    for name, value in sorted(metrics.items()):
        info = metric_info(name)
        if (info is None or info.table not in HEADLINE_TABLES or not isinstance(value, float)
                or (info.table == "mmlu" and info.subject != "avg")):
            continue
        label = "MMLU" if info.table == "mmlu" else info.label
        out[label] = f"{value * info.scale:.{info.digits}f}"
    return out


def write_job_status(output_dir: str | os.PathLike, record: Any, resumed: bool) -> Path:
    """Atomically write this job's outcome next to Hydra's own files for the job."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"outcome": job_outcome(record.status, resumed), "status": record.status,
            "run_id": record.run_id, "config_hash": record.config_hash, "model": record.model,
            "method": record.method, "bits": record.bits, "eval": record.eval,
            "error": record.error, "headline": headline_metrics(record.metrics)}
    tmp = out / f".{JOB_STATUS_FILE}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(data), encoding="utf-8")
    final = out / JOB_STATUS_FILE
    os.replace(tmp, final)
    return final


def summarize_sweep(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """Counts of job outcomes under a Hydra sweep directory (one numbered subdir per job)."""
    sweep = Path(sweep_dir)
    counts: Counter[str] = Counter({k: 0 for k in OUTCOMES})
    failed: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    job_dirs = sorted((d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()),
                      key=lambda d: int(d.name)) if sweep.is_dir() else []
    for d in job_dirs:
        try:
            data = json.loads((d / JOB_STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            counts["missing"] += 1
            jobs.append({"job": int(d.name), "outcome": "missing"})
            continue
        counts[data["outcome"]] += 1
        jobs.append({"job": int(d.name), **{k: data.get(k) for k in (
            "model", "method", "bits", "eval", "outcome", "error", "headline")}})
        if data["outcome"] == "failed":
            failed.append({"job": int(d.name), "run_id": data["run_id"], "error": data["error"]})
    return {"sweep_dir": str(sweep), "jobs": len(job_dirs), "counts": dict(counts),
            "failed": failed, "table": jobs}


def jobs_table(jobs: list[dict[str, Any]]) -> str:
    """Markdown: one row per job (outcome, headline metrics or the reason it did not run)."""
    lines = ["| job | model | method | bits | eval | outcome | result |",
             "|--:|:--|:--|:--|:--|:--|:--|"]
    for j in jobs:
        if j.get("headline"):
            result = ", ".join(f"{k} {v}" for k, v in j["headline"].items())
        else:
            result = " ".join(str(j.get("error") or "").split())[:80]
        cells = [str(j["job"]), *(str(j.get(k) or "") for k in ("model", "method", "bits", "eval")),
                 j["outcome"], result.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_size(config: DictConfig) -> int | None:
    """Jobs the sweeper launches: the product of the choices swept in hydra.sweeper.params
    and on the command line (the command line wins for a key), times the `jobs:` entries;
    None when it cannot be counted (e.g. a glob sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = {str(k): f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()}
    for o in config.hydra.overrides.task:
        args[str(o).split("=", 1)[0].lstrip("+~")] = str(o)
    try:
        n = 1
        for ov in OverridesParser.create().parse_overrides(list(args.values())):
            if ov.is_sweep_override():
                n *= len(list(ov.sweep_string_iterator()))
        return n * max(len(job_list(OmegaConf.to_container(config.jobs)
                                    if config.get("jobs") is not None else None)), 1)
    except Exception:  # noqa: BLE001 - progress is informative; never fail a sweep over it
        return None


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class SweepSummary(Callback):
    """Progress after each job; at the end the table of what the sweep produced and the
    ok/failed/skipped/resumed counts (also in <sweep dir>/sweep_summary.json)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.total: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start, self.total = time.monotonic(), sweep_size(config)
        log.info("sweep: %s jobs", self.total if self.total is not None else "unknown number of")

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self.start is None:          # a single run, not a sweep
            return
        done = int(config.hydra.job.num) + 1
        elapsed = time.monotonic() - self.start
        try:
            status = json.loads((Path(config.hydra.runtime.output_dir) / JOB_STATUS_FILE)
                                .read_text(encoding="utf-8"))
            what = f"{status['method']} {status['bits']}: {status['outcome']}"
        except (OSError, json.JSONDecodeError, KeyError):
            what = "no status"
        left = ("" if not self.total else
                f", about {_duration(elapsed / done * max(self.total - done, 0))} left")
        log.info("sweep progress: job %d of %s done (%s), elapsed %s%s", done,
                 self.total or "?", what, _duration(elapsed), left)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = summarize_sweep(config.hydra.sweep.dir)
        if summary["table"]:
            log.info("sweep results:\n%s", jobs_table(summary["table"]))
        c = summary["counts"]
        log.info("sweep summary (%d jobs): %d ok, %d failed, %d skipped, %d resumed "
                 "(finished before, not rerun), %d missing (no status; rerun the command)",
                 summary["jobs"], c["ok"], c["failed"], c["skipped"], c["resumed"], c["missing"])
        for f in summary["failed"]:
            log.info("  failed job %d (%s): %s", f["job"], f["run_id"], f["error"])
        path = Path(summary["sweep_dir"]) / SUMMARY_FILE
        if path.parent.is_dir():
            path.write_text(json.dumps(summary, indent=1), encoding="utf-8")


def _save_yaml(data: Any, path: Path) -> None:
    from omegaconf import OmegaConf
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    OmegaConf.save(OmegaConf.create(data), tmp)
    os.replace(tmp, path)


def scrubbed_hydra_files(config: DictConfig) -> dict[str, Any]:
    """Hydra's .hydra/{config,hydra,overrides}.yaml contents with secrets redacted (by key
    and, for values given on the command line, wherever they appear)."""
    from omegaconf import OmegaConf
    overrides = [str(o) for o in config.hydra.overrides.task]
    secrets = override_secrets(overrides)
    full = OmegaConf.to_container(config, resolve=False)
    hydra_node = full.pop("hydra")
    return {"config.yaml": scrub_tree(full, secrets),
            "hydra.yaml": scrub_tree({"hydra": hydra_node}, secrets),
            "overrides.yaml": scrub_tree(overrides, secrets)}


class ScrubbedHydraOutputs(Callback):
    """Hydra stores the composed config and the command line in plain text (per job
    .hydra/*.yaml, per sweep multirun.yaml). conf/run.yaml turns Hydra's own copies off
    (hydra.output_subdir: null); this writes them with secrets redacted, and redacts the
    sweep's multirun.yaml, which Hydra writes unconditionally."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        out = Path(config.hydra.runtime.output_dir) / ".hydra"
        for name, data in scrubbed_hydra_files(config).items():
            _save_yaml(data, out / name)
        self._scrub_multirun_yaml(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._scrub_multirun_yaml(config)

    @staticmethod
    def _scrub_multirun_yaml(config: DictConfig) -> None:
        from omegaconf import OmegaConf
        try:
            path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        except Exception:  # noqa: BLE001 - no sweep dir in a single run
            return
        if not path.is_file():
            return
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        secrets = override_secrets(((data.get("hydra") or {}).get("overrides") or {}).get(
            "task") or [])
        clean = scrub_tree(data, secrets)
        if clean != data:
            _save_yaml(clean, path)


class LauncherPluginMissing(SystemExit):
    pass


def require_launcher_plugin(argv: list[str]) -> None:
    """Stop with an actionable message when `launcher=X` names a plugin that is not installed
    (Hydra itself would only say that hydra/launcher/X is not found)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "launcher" or value not in LAUNCHER_PLUGINS:
            continue
        module, package = LAUNCHER_PLUGINS[value]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise LauncherPluginMissing(
                f"launcher={value} needs the Hydra plugin {package!r}, which is not installed: "
                f"pip install {package}" +
                ("" if value == "ray" else "  (or: pip install 'ptqbench[launchers]')"))
