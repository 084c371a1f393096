"""run_one(cfg) -> RunRecord: the path of one job.

    resolve config -> hash -> (skip if an ok record exists) -> build method config
    -> load model -> method.check -> calibration -> method.quantize -> [to_runtime]
    -> evaluators -> one atomic record (ok | failed | skipped)

Every exception after the config is read becomes a `failed` record with its error; an
unsupported combination becomes `skipped` with the reason. The sweep goes on.
"""

from __future__ import annotations

import copy
import fcntl
import gc
import hashlib
import logging
import os
import signal
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from harness.evals import EvalContext, get_evaluator
from harness.inputs.calib import CalibSpec, load_calibration
from harness.inputs.data import CALIB_SOURCES, DataMissingError, files_read
from harness.inputs.models import LoadedModel, ModelLoadError, load_model, model_label
from harness.results.store import (
    DONE_STATUSES,
    ResultStore,
    RunRecord,
    config_hash,
    identity_config,
    new_run_id,
)
from harness.results.tracking import make_tracker
from harness.run import provenance
from harness.run.cache import (
    CacheEntryError,
    QuantizedModelCache,
    cache_key,
    cache_key_parts,
    tensor_digests,
)
from harness.run.data_identity import fingerprint, job_data_sources, undeclared_reads
from harness.run.devices import job_gpu
from harness.run.mixed_precision import record_size_and_precision, resolve_selection
from harness.run.settings import RunSettings, resolved_config, settings_from
from harness.util.security import UnsafePathError, safe_name, scrub_secrets, within_root
from methods.base import ConfigError, Method, make_config
from methods.blockwise import compute_on
from methods.catalog import build, config_field_defaults

log = logging.getLogger(__name__)

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return resolved_config(cfg)


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
    elif isinstance(e, (UnsafePathError, ConfigError)):
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


def _labels(full: dict[str, Any]) -> dict[str, str]:
    """Record labels from the effective (resolved) config: the bits label is built from the
    bit widths that ran (`bits=w4a8 bits.w_bits=8` is w8a8; KV bits: w4a8kv4), the method label is the preset
    name only when that preset builds the config class that ran."""
    def node(group: str) -> dict:
        v = full.get(group)
        return v if isinstance(v, dict) else {}
    method, bits = node("method"), node("bits")
    w = method.get("w_bits", bits.get("w_bits"))
    a = method.get("a_bits", bits.get("a_bits"))
    kv = method.get("kv_bits", bits.get("kv_bits"))
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (w, a))
    kv_label = f"kv{kv}" if isinstance(kv, int) and not isinstance(kv, bool) and kv < 16 else ""
    return {"model": str(node("model").get("name") or "unnamed"),
            "method": method_label(method),
            "bits": f"w{w}a{a}{kv_label}" if ints else str(bits.get("name")),
            "eval": str(node("eval").get("name"))}


def method_label(method: dict[str, Any]) -> str:
    """conf/method/<name>.yaml's name when that preset's _target_ is the one that ran,
    else the target's class name (a `method._target_=...` override is never labelled as
    the preset it replaced)."""
    name, target = str(method.get("name")), method.get("_target_")
    try:
        preset = REPO_CONF / "method" / f"{safe_name(name, 'method.name')}.yaml"
    except UnsafePathError:
        return name          # refused by _execute's safe_name check, with the reason
    if not target or not preset.is_file():
        return name
    preset_target = (OmegaConf.load(preset) or {}).get("_target_")
    if preset_target in (None, target):
        return name
    return str(target).rsplit(".", 1)[-1].removesuffix("Config").lower() or name


class RunsDirError(RuntimeError):
    """The runs directory cannot take a record: raised before any work is done."""


def write_probe(directory: str | Path) -> OSError | None:
    """None when a file can be created in `directory` (made if missing), else the error."""
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e
    return None


def writable_store(runs_dir: str | Path) -> ResultStore:
    """The record store, after checking a record can be written there (fail before the
    work, never lose a finished job's result at the last step)."""
    e = write_probe(runs_dir)
    if e is not None:
        raise RunsDirError(f"paths.runs_dir={str(runs_dir)!r} cannot take run records "
                           f"({type(e).__name__}: {e}); point paths.runs_dir (or "
                           "paths.results_dir) at a writable directory") from e
    return ResultStore(Path(runs_dir))


def check_artifacts_dir(artifacts_dir: str | Path) -> None:
    """Plots, tables, checkpoints and exports go there after the work: fail before it."""
    e = write_probe(artifacts_dir)
    if e is not None:
        raise ConfigError(f"paths.artifacts_dir={str(artifacts_dir)!r} cannot take the run's "
                          f"artifacts ({type(e).__name__}: {e}); point paths.artifacts_dir (or "
                          "paths.results_dir) at a writable directory")


class JobInterrupted(KeyboardInterrupt):
    """SIGTERM during a job (SIGINT raises KeyboardInterrupt itself)."""


@contextmanager
def sigterm_interrupts():
    """SIGTERM raises JobInterrupted in the main thread for the duration of the job."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def handler(signum, frame):
        raise JobInterrupted(f"signal {signal.Signals(signum).name}")
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def config_lock(store: ResultStore, cfg_hash: str):
    """One process at a time per config hash (two identical sweeps started together): the
    second waits, then finds the first one's record and skips."""
    lock_dir = store.root / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{cfg_hash}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("config %s is running in another process; waiting for it", cfg_hash)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prior_result(store: ResultStore, cfg_hash: str, cfg: DictConfig) -> RunRecord | None:
    """The record that makes this job already done: ok or skipped (or, with
    rerun_failed=false, failed). partial and interrupted jobs always rerun."""
    if cfg.get("force", False):
        return None
    prior = store.find(cfg_hash, status=None)
    done = [r for r in prior if r["status"] in DONE_STATUSES]
    if not done and not cfg.get("rerun_failed", True):
        done = [r for r in prior if r["status"] == "failed"]
    if not done:
        return None
    rec = done[-1]
    prior_rec = RunRecord(**{k: rec[k] for k in RunRecord.__dataclass_fields__ if k in rec})
    prior_rec.provenance = {**prior_rec.provenance, "resumed": True}   # not stored
    return prior_rec


def _identity(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any], RunSettings | None,
                                        ConfigError | None]:
    """(scrubbed config, identity, settings, config error). The identity is the config
    that can change a number plus the fingerprint of the data the job reads."""
    try:
        try:
            _fill_model_label(cfg)
        except ModelLoadError as e:     # model=local without its path: a config error
            raise ConfigError(str(e)) from None
        full = scrub_secrets(resolved_config(cfg))
        settings = settings_from(cfg)
    except ConfigError as e:
        raw = OmegaConf.to_container(cfg, resolve=False)
        return scrub_secrets(raw), identity_config(scrub_secrets(raw)), None, e
    ident = identity_config(full)
    sources = job_data_sources(full)
    if sources:
        ident["data"] = fingerprint(sources, settings.data_dir, Path(cfg.paths.cache_dir))
    return full, ident, settings, None


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


def job_config_hash(cfg: DictConfig) -> str:
    """The config hash run_one gives this job (config identity + data fingerprint)."""
    return config_hash(_identity(cfg)[1])


def run_one(cfg: DictConfig) -> RunRecord:
    store = writable_store(cfg.paths.runs_dir)
    full, ident, settings, config_error = _identity(cfg)
    cfg_hash = config_hash(ident)
    labels = _labels(full)
    with config_lock(store, cfg_hash):
        prior = None if config_error else _prior_result(store, cfg_hash, cfg)
        if prior is not None:
            log.info("resume: skip %s, %s record %s exists (force=true reruns)", labels,
                     prior.status, prior.run_id)
            return prior
        record = RunRecord(run_id=new_run_id(cfg_hash), config_hash=cfg_hash, status="ok",
                           config=full, sweep=cfg.get("sweep"), **labels)
        if "data" in ident:
            record.provenance["data_fingerprint"] = ident["data"]
        return _run_and_record(cfg, record, store, settings, config_error)


def _run_and_record(cfg: DictConfig, record: RunRecord, store: ResultStore,
                    settings: RunSettings | None, config_error: ConfigError | None) -> RunRecord:
    timer = Timer()
    tracker = None
    files_read(reset=True)
    interrupted: BaseException | None = None
    try:
        with sigterm_interrupts():
            if config_error is not None:
                raise config_error
            check_artifacts_dir(cfg.paths.artifacts_dir)
            tracker = make_tracker(cfg.get("tracking"), record)
            with job_gpu(_wants_gpu(cfg)) as gpu:   # one GPU per concurrent job of a sweep
                if gpu is not None:
                    record.provenance["gpu"] = gpu
                _execute(cfg, record, timer, settings)
    except Skip as e:
        record.status, record.error = "skipped", str(e)
        log.warning("skipped %s: %s", _short(record), e)
    except KeyboardInterrupt as e:      # SIGINT, or SIGTERM through sigterm_interrupts
        record.status = "interrupted"
        record.error = f"interrupted: {type(e).__name__}: {e or 'SIGINT'}"
        interrupted = e
        log.error("interrupted %s: the record says so and resume reruns it", _short(record))
    except Exception as e:  # noqa: BLE001 - any failure becomes a record, the sweep goes on
        record.status = "failed"
        record.error = failure_reason(e)
        record.provenance["traceback"] = traceback.format_exc(limit=8)
        log.error("failed %s: %s", _short(record), record.error)
    finally:
        record.timings, record.memory = timer.timings, timer.memory
        undeclared = undeclared_reads(files_read(), job_data_sources(record.config))
        if undeclared:   # read but not fingerprinted: the identity may miss a change
            record.provenance["data_read_unfingerprinted"] = undeclared
            log.warning("job read data files its identity does not cover: %s", undeclared)
        device = torch.device(record.provenance.get("device", "cpu"))
        record.provenance = {**provenance.collect(device, _seed(cfg)), **record.provenance}
        path = store.write(record)
        if tracker is not None:
            tracker.finish(record)
        log.info("record %s (%s) -> %s", record.run_id, record.status, path)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if interrupted is not None:
        raise interrupted
    return record


def _wants_gpu(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() and str(cfg.model.get("device", "auto")) in ("auto", "cuda")


def _short(record: RunRecord) -> str:
    return f"{record.model} {record.method} {record.bits} {record.eval}"


def _seed(cfg: DictConfig) -> Any:
    try:
        return int(cfg.get("seed"))
    except (TypeError, ValueError):
        return None


def _execute(cfg: DictConfig, record: RunRecord, timer: Timer, settings: RunSettings) -> None:
    for group in ("model", "method", "bits", "eval"):   # labels end up in file names
        safe_name(cfg[group].name, f"{group}.name")
    for label in ("model", "method", "bits", "eval"):
        safe_name(getattr(record, label), f"record label {label}")
    method = build_method(cfg.method, cfg.paths.runs_dir)
    record.provenance["method"] = method.describe()
    reason = method.check_bits()
    if reason:   # before paying for the model load
        raise Skip(reason)
    data_dir = settings.data_dir
    cache_dir = Path(cfg.paths.cache_dir)
    method.cache_dir = cache_dir
    torch.manual_seed(settings.seed)

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
        _execute_loaded(cfg, record, timer, method, lm, data_dir, cache_dir, settings)
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
                    lm: LoadedModel, data_dir: Path | None, cache_dir: Path,
                    settings: RunSettings) -> None:
    device = lm.device
    reason = method.check(lm.spec) or context_length_reason(
        lm.model, settings, method.needs_calibration, cfg.eval)
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
    errors = record.provenance.get("eval_errors")
    if errors and not n_eval_metrics:
        raise EvalsFailed(errors)
    if errors:   # some evaluations ran: partial, rerun on resume; the report names the gaps
        record.status = "partial"
        record.error = "partial: " + "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))


# Config attributes that hold a model's context length, by family (first present wins).
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                       "seq_length", "n_ctx")


def model_context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for key in CONTEXT_LENGTH_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def context_length_reason(model: torch.nn.Module, settings: RunSettings, calibrates: bool,
                          eval_cfg: Any) -> str | None:
    """Why the job cannot run within the model's context length (None: it can). Positions
    past the trained length give numbers from an extrapolation nobody asked for."""
    limit = model_context_length(model)
    if limit is None:
        return None
    needs = []
    if settings.eval.seqlen is not None:
        needs.append(("eval.seqlen", settings.eval.seqlen))
    if "prompt_lens" in eval_cfg:
        needs += [("eval.prompt_lens", max(int(p) for p in eval_cfg.prompt_lens))]
    if "decode_prompt_len" in eval_cfg:
        needs.append(("eval.decode_prompt_len + eval.new_tokens",
                      int(eval_cfg.decode_prompt_len) + int(eval_cfg.get("new_tokens", 0))))
    if calibrates:
        needs.append(("calib.seqlen", settings.calib.seqlen))
    over = [f"{k}={v}" for k, v in needs if v > limit]
    if not over:
        return None
    return (f"{', '.join(over)} exceeds the model's context length ({limit} positions, "
            "max_position_embeddings); use a value <= that")


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
    except (ExportError, OSError) as e:    # OSError: an unwritable or full artifacts disk
        log.error("export %s failed: %s", fmt, e)
        return {"format": fmt, "error": f"{type(e).__name__}: {e}"}


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
                lm.model.config.vocab_size, calib_data_fingerprint(record, spec.dataset))
        except (DataMissingError, MemoryError):
            raise
        except (ValueError, OSError) as e:
            raise DataError(f"calibration data {spec.dataset!r}: {e}") from e
    record.provenance["calibration"] = calib_info
    return calib


def calib_data_fingerprint(record: RunRecord, dataset: str) -> str | None:
    """Digest of the calibration text's sources from the job's data fingerprint (None for
    sources without files, e.g. random tokens)."""
    fp = record.provenance.get("data_fingerprint") or {}
    parts = [f"{src}={fp[src]}" for src in CALIB_SOURCES.get(dataset, ()) if src in fp]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else None


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
    calib_part = None
    if method.needs_calibration:   # the calibration text's content is part of the key
        calib_part = {**resolved(cfg.calib),
                      "data": calib_data_fingerprint(record, str(cfg.calib.dataset))}
    parts = scrub_secrets(cache_key_parts(
        resolved(cfg.model), resolved(cfg.method), calib_part, cfg.seed, method))
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
    base = tensor_digests(lm.model)   # tensors quantization leaves alone are not stored
    model = _quantize(method, lm, timer, calib)
    try:
        with timer.phase("cache_save", lm.device):
            qcache.save(key, parts, model, lm.spec, method.artifacts,
                        {"calibration": record.provenance.get("calibration"),
                         "method": method.describe()}, base_digests=base)
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
