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
from omegaconf import DictConfig, OmegaConf, open_dict

from harness.evals import EvalContext, get_evaluator
from harness.inputs.calib import CalibSpec, load_calibration
from harness.inputs.data import DataMissingError, resolve_data_dir
from harness.inputs.models import LoadedModel, ModelLoadError, load_model, model_label
from harness.results.store import ResultStore, RunRecord, config_hash, new_run_id
from harness.results.tracking import make_tracker
from harness.run import provenance
from harness.run.cache import (
    CacheEntryError,
    QuantizedModelCache,
    cache_key,
    cache_key_parts,
)
from harness.run.devices import job_gpu
from harness.run.mixed_precision import record_size_and_precision, resolve_selection
from harness.util.security import UnsafePathError, safe_name, scrub_secrets, within_root
from methods.base import ConfigError, Method, make_config
from methods.blockwise import compute_on
from methods.catalog import build, config_field_defaults

log = logging.getLogger(__name__)

# Keys that change where or how results are written, not what is measured.
NON_IDENTITY_KEYS = ("paths", "launcher", "tracking", "force", "rerun_failed", "sweep", "hydra",
                     "cache", "save_checkpoint", "export", "placement")


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


class DataError(ValueError):
    """A data file is missing or malformed (the message names the file)."""


class EvalsFailed(RuntimeError):
    """Every evaluation of the job failed; `category` comes from the errors' types."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        kinds = " ".join(errors.values())
        self.category = ("non-finite" if "FloatingPointError" in kinds else
                         "data" if any(k in kinds for k in ("DataMissingError",
                                                            "FileNotFoundError", "ValueError"))
                         else None)
        super().__init__(f"every evaluation failed: {errors}")


def failure_reason(e: BaseException) -> str:
    """`record.error` of a failed job: '<category>: <type>: <message>' where known."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        category = "out of memory"
    elif isinstance(e, FloatingPointError):
        category = "non-finite"
    elif isinstance(e, ModelLoadError):
        category = "model load"
    elif isinstance(e, (DataError, DataMissingError)):
        category = "data"
    elif isinstance(e, UnsafePathError):
        category = "config"
    elif isinstance(e, EvalsFailed):
        category = e.category
    else:
        category = None
    return f"{category + ': ' if category else ''}{type(e).__name__}: {e}"


def build_method(method_cfg: DictConfig, runs_dir: str | None = None) -> Method:
    node = OmegaConf.to_container(method_cfg, resolve=True)
    name = node.pop("name", None)  # the label; the registry picks the class by config type
    selection = resolve_selection(node, runs_dir)  # keep_top_k_sensitive -> keep_fp
    _reject_foreign_settings(name, node)
    try:
        qcfg = make_config(node)   # _target_ from the methods package only, never called
    except ConfigError as e:
        raise Skip(str(e)) from e
    method = build(qcfg)
    if selection:
        method.artifacts["mixed_precision_selection"] = selection
    return method


def _reject_foreign_settings(name: str | None, node: dict) -> None:
    """A multirun over methods applies `method.key=v` to every method; one whose config has
    no such field (`method=awq,llmc_awq method.inputs_from=fp`) is skipped, saying so."""
    fields = config_field_defaults(node["_target_"]) if node.get("_target_") else None
    if fields is None:
        return          # make_config() reports a target that is not a methods config
    known = set(fields) | {"_target_"}
    foreign = sorted(set(node) - known)
    if foreign:
        raise Skip(f"method {name} has no setting {', '.join(foreign)} (set for another "
                   f"method of the sweep?); its settings: {', '.join(sorted(known - {'_target_'}))}")


def _labels(cfg: DictConfig) -> dict[str, str]:
    return {"model": str(cfg.model.get("name") or "unnamed"), "method": str(cfg.method.name),
            "bits": str(cfg.bits.name), "eval": str(cfg.eval.name)}


def _fill_model_label(cfg: DictConfig) -> None:
    """model.name unset (model=local): the label is the checkpoint directory's name or the
    GGUF file's stem, stored in the config so records, hashes and reports carry it."""
    src = cfg.model.get("source") or {}
    if "path" in src.keys() and OmegaConf.is_missing(src, "path"):
        raise ModelLoadError(f"model={cfg.model.get('name') or 'local'} needs "
                             "model.source.path=/path/to/checkpoint_dir (or a .gguf file with "
                             "model.source.kind=gguf)")
    if cfg.model.get("name") or "path" not in src.keys():
        return
    with open_dict(cfg):
        cfg.model.name = model_label(cfg.model)


def run_one(cfg: DictConfig) -> RunRecord:
    _fill_model_label(cfg)
    full = scrub_secrets(resolved(cfg))   # records never hold secret-looking values
    cfg_hash = config_hash(identity_config(full))
    store = ResultStore(cfg.paths.runs_dir)
    labels = _labels(cfg)
    if not cfg.get("force", False):
        prior = store.find(cfg_hash, status=None)
        done = [r for r in prior if r["status"] in ("ok", "skipped")]
        if done or (prior and not cfg.get("rerun_failed", True)):
            rec = (done or prior)[-1]
            log.info("resume: skip %s, %s record %s exists (force=true reruns)", labels,
                     rec["status"], rec["run_id"])
            prior_rec = RunRecord(**{k: rec[k] for k in RunRecord.__dataclass_fields__ if k in rec})
            prior_rec.provenance = {**prior_rec.provenance, "resumed": True}   # not stored
            return prior_rec

    record = RunRecord(run_id=new_run_id(cfg_hash), config_hash=cfg_hash, status="ok",
                       config=full, sweep=cfg.get("sweep"), **labels)
    device = torch.device("cpu")
    tracker = make_tracker(cfg.get("tracking"), record)
    timer = Timer()
    try:
        with job_gpu(_wants_gpu(cfg)) as gpu:   # one GPU per concurrent job of a sweep
            if gpu is not None:
                record.provenance["gpu"] = gpu
            _execute(cfg, record, timer)
    except Skip as e:
        record.status, record.error = "skipped", str(e)
        log.warning("skipped %s: %s", labels, e)
    except Exception as e:  # noqa: BLE001 - any failure becomes a record, the sweep goes on
        record.status = "failed"
        record.error = failure_reason(e)
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


def _wants_gpu(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() and str(cfg.model.get("device", "auto")) in ("auto", "cuda")


def _execute(cfg: DictConfig, record: RunRecord, timer: Timer) -> None:
    for group in ("model", "method", "bits", "eval"):   # labels end up in file names
        safe_name(cfg[group].name, f"{group}.name")
    method = build_method(cfg.method, cfg.paths.runs_dir)
    record.provenance["method"] = method.describe()
    reason = method.check_bits()
    if reason:   # before paying for the model load
        raise Skip(reason)
    data_dir = resolve_data_dir(cfg.paths.get("data_dir"))
    cache_dir = Path(cfg.paths.cache_dir)
    method.cache_dir = cache_dir
    torch.manual_seed(int(cfg.seed))

    load_device = torch.device("cpu")
    with timer.phase("load", load_device):
        lm = _load(cfg, cache_dir)
    device = lm.device
    record.provenance.update(device=str(device), model_info=lm.info,
                             data_dir=str(data_dir) if data_dir else None)
    log.info("job %s: %s on %s (%s)", record.run_id, method.name, device, lm.info["dtype"])

    if lm.block_store is not None:
        _refuse_whole_model_steps(cfg)
    with compute_on(lm.device if lm.offloaded else None, lm.block_store):   # one block at a time
        _execute_loaded(cfg, record, timer, method, lm, data_dir, cache_dir)
    if lm.block_store is not None:
        record.provenance["block_store"] = {"reads": lm.block_store.reads,
                                            "writes": lm.block_store.writes}


def _refuse_whole_model_steps(cfg: DictConfig) -> None:
    """Steps that need every weight in memory at once cannot run with placement.mode=disk."""
    whole = [k for k in ("runtime", "save_checkpoint", "export") if cfg.get(k)]
    if cfg.eval.get("needs_reference_model"):
        whole.append(f"eval={cfg.eval.name}")
    if whole:
        raise Skip(f"{', '.join(whole)} need the whole model in memory; placement.mode=disk "
                   "keeps one block at a time (use placement.mode=offload)")


def _execute_loaded(cfg: DictConfig, record: RunRecord, timer: Timer, method: Method,
                    lm: LoadedModel, data_dir: Path | None, cache_dir: Path) -> None:
    device = lm.device
    reason = method.check(lm.spec)
    if reason:
        raise Skip(reason)

    calib = _calibration(cfg, method, lm, record, timer, data_dir, cache_dir)
    # evals that compare against the full-precision model (diagnostics) get a copy
    reference = copy.deepcopy(lm.model) if cfg.eval.get("needs_reference_model") else None
    model, lm = _quantize_cached(cfg, method, lm, record, timer, calib)
    if method.config.quantizes_kv_cache:   # not cached: applied after a cache hit too
        with timer.phase("quantize_kv_cache", device):
            model = method.quantize_kv_cache(model, lm.spec, calib)
    record_size_and_precision(record, model, lm.spec, method,
                              method.artifacts.get("mixed_precision_selection"))
    run_dir = within_root(cfg.paths.artifacts_dir,
                          Path(cfg.paths.artifacts_dir) / record.run_id, "artifact dir")
    if cfg.get("export"):   # from the simulated model: runtime modules hold kernel layouts
        with timer.phase("export", device):
            record.artifacts["export"] = _export(cfg, method, model, lm, record, run_dir)
    if cfg.get("runtime", False):
        with timer.phase("to_runtime", device):
            model = method.to_runtime(model, lm.spec)
    record.artifacts.update(method.artifacts)
    record.provenance["model_repr"] = _linear_summary(model, lm.spec)

    record.artifacts.update(method.write_artifacts(run_dir))   # plots / tables (path -> record)
    if cfg.get("save_checkpoint", False):
        from methods.checkpoint import save_runtime_checkpoint
        meta = {"method": method.describe(), "run_id": record.run_id, "model": record.model,
                "bits": record.bits, "config_hash": record.config_hash}
        record.artifacts["checkpoint"] = str(
            save_runtime_checkpoint(model, lm.spec, run_dir / "checkpoint", meta))
    if cfg.get("runtime", False) and cfg.get("runtime_fuse", False):
        from methods.fusion import fuse_runtime  # one launch per linear group (after saving)
        model = fuse_runtime(model, lm.spec, record.artifacts.setdefault("runtime_fusion", {}))
    placement = lm.info.get("placement") or {}
    ctx = EvalContext(model=model, tokenizer=lm.tokenizer, spec=lm.spec, data_dir=data_dir,
                      run_dir=run_dir, device=device, method=method, calib=calib,
                      reference_model=reference, placement=placement.get("path", "device"),
                      device_budget_bytes=placement.get("budget_bytes"))
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
        raise EvalsFailed(record.provenance["eval_errors"])


def _export(cfg: DictConfig, method: Method, model: torch.nn.Module, lm: LoadedModel,
            record: RunRecord, run_dir: Path) -> dict[str, Any]:
    """export=<format>: the quantized model as a serving checkpoint beside the record. An
    export that cannot be made is reported in the record (the evals still run)."""
    from methods.export import ExportError, export_model
    fmt = str(cfg.export)
    meta = {"run_id": record.run_id, "model": record.model, "method": record.method,
            "bits": record.bits, "config_hash": record.config_hash}
    try:
        return export_model(model, lm.spec, fmt, run_dir / f"export-{fmt}",
                            tokenizer=lm.tokenizer, meta=meta, kv_bits=method.config.kv_bits)
    except ExportError as e:
        log.error("export %s failed: %s", fmt, e)
        return {"format": fmt, "error": str(e)}


def _load(cfg: DictConfig, cache_dir: Path) -> LoadedModel:
    """load_model; any failure other than out-of-memory becomes a ModelLoadError."""
    try:
        return load_model(cfg.model, cache_dir, cfg.get("placement"))
    except (ModelLoadError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad checkpoint
        raise ModelLoadError(f"could not load model {cfg.model.name!r}: "
                             f"{type(e).__name__}: {e}") from e


def _calibration(cfg: DictConfig, method: Method, lm: LoadedModel, record: RunRecord,
                 timer: Timer, data_dir: Path | None, cache_dir: Path) -> list | None:
    """Calibration token batches when the method needs them (cached on disk), else None."""
    if not (method.needs_calibration or method.needs_kv_calibration):
        return None
    spec = CalibSpec(**OmegaConf.to_container(cfg.calib, resolve=True))
    with timer.phase("calibration_data", torch.device("cpu")):
        try:
            calib, calib_info = load_calibration(
                lm.tokenizer, spec, data_dir, cache_dir, bool(cfg.calib_allow_hub),
                lm.model.config.vocab_size)
        except (DataMissingError, MemoryError):
            raise
        except (ValueError, OSError) as e:
            raise DataError(f"calibration data {spec.dataset!r}: {e}") from e
    record.provenance["calibration"] = calib_info
    return calib


def _quantize(method: Method, lm: LoadedModel, timer: Timer, calib: list | None
              ) -> torch.nn.Module:
    with timer.phase("quantize", lm.device):
        return method.quantize(lm.model, lm.spec, calib)


def _quantize_cached(cfg: DictConfig, method: Method, lm: LoadedModel, record: RunRecord,
                     timer: Timer, calib: list | None) -> tuple[torch.nn.Module, LoadedModel]:
    """method.quantize through the quantized-model cache (harness/run/cache.py).
    provenance.cache: hit (quantize skipped) | miss | rebuilt (bad entry replaced) | off."""
    qcache = QuantizedModelCache.from_config(cfg.get("cache"))
    c = method.config
    if (qcache is None or not (c.quantizes_weights or c.quantizes_activations)
            or not method.cacheable     # e.g. state outside FakeQuantLinear
            or lm.block_store is not None):   # blocks on disk: the store holds them
        record.provenance["cache"] = "off"
        return _quantize(method, lm, timer, calib), lm
    parts = scrub_secrets(cache_key_parts(
        resolved(cfg.model), resolved(cfg.method),
        resolved(cfg.calib) if method.needs_calibration else None, cfg.seed, method))
    key = cache_key(parts)
    record.provenance["cache_key"] = key
    status = "miss"
    try:
        manifest = qcache.read_manifest(key)
    except CacheEntryError as e:
        qcache.discard(key, str(e))
        manifest, status = None, "rebuilt"
    if manifest is not None:
        try:
            with timer.phase("cache_load", lm.device):
                hit = qcache.restore(key, manifest, lm.model, lm.spec)
        except CacheEntryError as e:
            qcache.discard(key, str(e))
            status = "rebuilt"
            with timer.phase("reload", torch.device("cpu")):   # the model was half-restored
                lm = _load(cfg, Path(cfg.paths.cache_dir))
        else:
            qcache.touch(key)
            method.artifacts.update(hit.artifacts)
            if manifest.get("calibration") is not None:
                record.provenance["calibration"] = manifest["calibration"]
            record.provenance["cache"] = "hit"
            log.info("cache hit %s: quantization skipped", key)
            return hit.model, lm
    model = _quantize(method, lm, timer, calib)
    try:
        with timer.phase("cache_save", lm.device):
            qcache.save(key, parts, model, lm.spec, method.artifacts,
                        {"calibration": record.provenance.get("calibration"),
                         "method": method.describe()})
    except Exception as e:  # noqa: BLE001 - a full disk or any cache fault: the job's result
        log.warning("quantized model not cached: %s: %s", type(e).__name__, e)  # stands
        status = "off" if isinstance(e, CacheEntryError) else status
    record.provenance["cache"] = status
    return model, lm


def _linear_summary(model: torch.nn.Module, spec) -> dict[str, int]:
    """How many block linears of each module type the evaluated model holds."""
    counts: dict[str, int] = {}
    for block in spec.blocks(model):
        for rel in spec.table.linear_names():
            kind = type(block.get_submodule(rel)).__name__
            counts[kind] = counts.get(kind, 0) + 1
    return counts
