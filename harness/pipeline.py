"""run_one(cfg) -> RunRecord: the path of one job.

    resolve config -> hash -> (skip if an ok record exists) -> build method config
    -> load model -> method.check -> calibration -> method.quantize -> [to_runtime]
    -> evaluators -> one atomic record (ok | failed | skipped)

Every exception after the config is read becomes a `failed` record with its error; an
unsupported combination becomes `skipped` with the reason. The sweep goes on.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness import provenance
from harness.calib import CalibSpec, load_calibration
from harness.data import resolve_data_dir
from harness.evals import EvalContext, get_evaluator
from harness.mixed_precision import record_size_and_precision, resolve_selection
from harness.models import load_model
from harness.store import ResultStore, RunRecord, config_hash, new_run_id
from harness.tracking import make_tracker
from methods.base import ConfigError, Method, QuantConfig, build

log = logging.getLogger(__name__)

# Keys that change where or how results are written, not what is measured.
NON_IDENTITY_KEYS = ("paths", "launcher", "tracking", "force", "rerun_failed", "sweep", "hydra")


def identity_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


class Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.memory: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str, device: torch.device):
        t0 = time.perf_counter()
        with provenance.PeakMemory(device) as mem:
            yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.memory[f"peak_{name}_mb"] = round(mem.peak_mb, 1)


class Skip(Exception):
    """The combination is not supported; the message is the reason."""


def build_method(method_cfg: DictConfig, runs_dir: str | None = None) -> Method:
    node = OmegaConf.to_container(method_cfg, resolve=True)
    node.pop("name", None)  # the label; the registry picks the class by config type
    selection = resolve_selection(node, runs_dir)  # keep_top_k_sensitive -> keep_fp
    try:
        qcfg = instantiate(node, _convert_="all")
    except Exception as e:  # Hydra wraps the dataclass's ValueError
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise Skip(str(cause)) from e
        raise
    if not isinstance(qcfg, QuantConfig):
        raise TypeError(f"method._target_ must build a QuantConfig, got {type(qcfg).__name__}")
    method = build(qcfg)
    if selection:
        method.artifacts["mixed_precision_selection"] = selection
    return method


def _labels(cfg: DictConfig) -> dict[str, str]:
    return {"model": str(cfg.model.name), "method": str(cfg.method.name),
            "bits": str(cfg.bits.name), "eval": str(cfg.eval.name)}


def run_one(cfg: DictConfig) -> RunRecord:
    full = resolved(cfg)
    cfg_hash = config_hash(identity_config(full))
    store = ResultStore(cfg.paths.runs_dir)
    labels = _labels(cfg)
    if not cfg.get("force", False):
        prior = store.find(cfg_hash, status=None)
        done = [r for r in prior if r["status"] in ("ok", "skipped")]
        if done or (prior and not cfg.get("rerun_failed", True)):
            rec = (done or prior)[-1]
            log.info("skip %s: %s record %s exists (force=true reruns)", labels,
                     rec["status"], rec["run_id"])
            return RunRecord(**{k: rec[k] for k in RunRecord.__dataclass_fields__ if k in rec})

    record = RunRecord(run_id=new_run_id(cfg_hash), config_hash=cfg_hash, status="ok",
                       config=full, sweep=cfg.get("sweep"), **labels)
    device = torch.device("cpu")
    tracker = make_tracker(cfg.get("tracking"), record)
    timer = Timer()
    try:
        _execute(cfg, record, timer)
    except Skip as e:
        record.status, record.error = "skipped", str(e)
        log.warning("skipped %s: %s", labels, e)
    except Exception as e:  # noqa: BLE001 - any failure becomes a record, the sweep goes on
        record.status = "failed"
        oom = isinstance(e, (torch.OutOfMemoryError, MemoryError))
        record.error = f"{'out of memory: ' if oom else ''}{type(e).__name__}: {e}"
        record.provenance["traceback"] = traceback.format_exc(limit=8)
        log.error("failed %s: %s", labels, record.error)
    finally:
        record.timings, record.memory = timer.timings, timer.memory
        device = torch.device(record.provenance.get("device", "cpu"))
        record.provenance = {**provenance.collect(device, cfg.get("seed")), **record.provenance}
        path = store.write(record)
        tracker.finish(record)
        log.info("record %s (%s) -> %s", record.run_id, record.status, path)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return record


def _execute(cfg: DictConfig, record: RunRecord, timer: Timer) -> None:
    method = build_method(cfg.method, cfg.paths.runs_dir)
    record.provenance["method"] = method.describe()
    data_dir = resolve_data_dir(cfg.paths.get("data_dir"))
    cache_dir = Path(cfg.paths.cache_dir)
    torch.manual_seed(int(cfg.seed))

    load_device = torch.device("cpu")
    with timer.phase("load", load_device):
        lm = load_model(cfg.model, cache_dir)
    device = lm.device
    record.provenance.update(device=str(device), model_info=lm.info,
                             data_dir=str(data_dir) if data_dir else None)
    log.info("job %s: %s on %s (%s)", record.run_id, method.name, device, lm.info["dtype"])

    reason = method.check(lm.spec)
    if reason:
        raise Skip(reason)

    calib = None
    if method.needs_calibration:
        spec = CalibSpec(**OmegaConf.to_container(cfg.calib, resolve=True))
        with timer.phase("calibration_data", load_device):
            calib, calib_info = load_calibration(
                lm.tokenizer, spec, data_dir, cache_dir, bool(cfg.calib_allow_hub),
                lm.model.config.vocab_size)
        record.provenance["calibration"] = calib_info

    # evals that compare against the full-precision model (diagnostics) get a copy
    reference = copy.deepcopy(lm.model) if cfg.eval.get("needs_reference_model") else None
    with timer.phase("quantize", device):
        model = method.quantize(lm.model, lm.spec, calib)
    record_size_and_precision(record, model, lm.spec, method,
                              method.artifacts.get("mixed_precision_selection"))
    if cfg.get("runtime", False):
        with timer.phase("to_runtime", device):
            model = method.to_runtime(model, lm.spec)
    record.artifacts.update(method.artifacts)
    record.provenance["model_repr"] = _linear_summary(model, lm.spec)

    run_dir = Path(cfg.paths.artifacts_dir) / record.run_id
    ctx = EvalContext(model=model, tokenizer=lm.tokenizer, spec=lm.spec, data_dir=data_dir,
                      run_dir=run_dir, device=device, method_name=method.name,
                      extra={"method": method, "cfg": cfg, "calib": calib,
                             "reference_model": reference})
    n_eval_metrics = 0
    for name in cfg.eval.evaluators:
        with timer.phase(f"eval_{name}", device):
            result = get_evaluator(name)(ctx, cfg.eval)
        record.metrics.update(result.metrics)
        n_eval_metrics += len(result.metrics)
        record.provenance.setdefault("eval", {}).update(result.provenance)
        record.artifacts.update(result.artifacts)
        if result.errors:
            record.provenance.setdefault("eval_errors", {}).update(result.errors)
    if not n_eval_metrics and record.provenance.get("eval_errors"):
        errs = record.provenance["eval_errors"]
        raise RuntimeError(f"every evaluation failed: {errs}")


def _linear_summary(model: torch.nn.Module, spec) -> dict[str, int]:
    """How many block linears of each module type the evaluated model holds."""
    counts: dict[str, int] = {}
    for block in spec.blocks(model):
        for rel in spec.table.linear_names():
            kind = type(block.get_submodule(rel)).__name__
            counts[kind] = counts.get(kind, 0) + 1
    return counts
