"""Accuracy evals through lm-eval-harness on the run's in-memory model.

`evaluate(ctx, cfg)` wraps `ctx.model`/`ctx.tokenizer` in lm-eval's HFLM (never reloading
from disk, so the quantized weights are what gets scored) and runs each requested task
separately, so one task's missing data or failure leaves the others' numbers intact.

cfg keys (conf/eval/commonsense.yaml, conf/eval/mmlu.yaml):
  tasks        names from harness.evals.tasks.ALL_TASKS
  num_fewshot  None = task default (mmlu 5, others 0)
  limit        first N docs per task (per subject for mmlu); None = all
  batch_size   HFLM batch size
  fewshot_seed seed of lm-eval's few-shot sampler
  source       "local": data dir + harness/evals/tasks YAMLs; "hub": lm-eval's own tasks
  bootstrap_iters (optional, default 1000) bootstrap resamples for perplexity stderr
  max_length   (optional) context length given to HFLM; default from the model config

Metric names: acc_<task>, acc_norm_<task> (where lm-eval defines it), each with _stderr;
ppl_lambada_openai; mmlu_avg, mmlu_stem, mmlu_humanities, mmlu_social_sciences, mmlu_other
(+ _stderr); acc_commonsense_avg = mean acc over the commonsense tasks that ran (>= 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.evals import EvalContext, EvalResult, MetricInfo
from harness.evals.tasks import (
    ALL_TASKS,
    COMMONSENSE_TASKS,
    MMLU_CATEGORIES,
    PreparedTask,
    prepare_task,
)
from harness.inputs.data import DataMissingError, resolve_data_dir
from harness.inputs.placement import spread_over_gpus

log = logging.getLogger(__name__)

DEFAULT_FEWSHOT = {"mmlu": 5}
SOURCES = ("local", "hub")
# lm-eval result keys are "<metric>,<filter>"; our tasks use the default "none" filter.
_METRICS = {"acc": "acc", "acc_norm": "acc_norm", "perplexity": "ppl"}
COMMONSENSE_AVG = "acc_commonsense_avg"
MMLU_LABELS = {"stem": "STEM", "humanities": "Humanities", "social_sciences": "Social Sci.",
               "other": "Other", "avg": "Avg."}
ACC_SCALE = 100.0   # lm-eval reports fractions; papers print percent


def metric_info(name: str) -> MetricInfo | None:
    """acc_<task> / acc_norm_<task> (table accuracy / accuracy_norm), acc_commonsense_avg,
    mmlu_<category> (table mmlu), ppl_<task> (LAMBADA word perplexity)."""
    def acc(table: str, label: str, subject: str, order: tuple, stderr: bool = True):
        return MetricInfo("lm_eval", table, label, "%", True, f"{name}_stderr" if stderr else None,
                          ACC_SCALE, kind=table, subject=subject, order=order)
    if name == COMMONSENSE_AVG:
        return acc("accuracy_avg", "Avg.", "commonsense", (), stderr=False)
    for prefix, table in (("acc_norm_", "accuracy_norm"), ("acc_", "accuracy")):
        task = name.removeprefix(prefix)
        if task != name and task in COMMONSENSE_TASKS:
            return acc(table, task, task, (task,))
    category = name.removeprefix("mmlu_")
    if category != name and category in MMLU_LABELS:
        return acc("mmlu", MMLU_LABELS[category], category,
                   (list(MMLU_LABELS).index(category),))
    task = name.removeprefix("ppl_")
    if task != name and task in ALL_TASKS:
        return MetricInfo("lm_eval", "word_perplexity", task, stderr=f"{name}_stderr",
                          subject=task, order=(task,))
    return None


@dataclass
class Options:
    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 16
    fewshot_seed: int = 1234
    source: str = "local"
    bootstrap_iters: int = 1000
    max_length: int | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> Options:
        try:
            from omegaconf import DictConfig, OmegaConf
            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:
            pass
        cfg = dict(cfg or {})
        tasks = cfg.get("tasks") or []
        if isinstance(tasks, str):
            tasks = [tasks]
        opts = cls(tasks=list(tasks),
                   **{k: cfg[k] for k in ("num_fewshot", "limit", "fewshot_seed", "max_length",
                                          "batch_size", "source", "bootstrap_iters")
                      if cfg.get(k) is not None})
        opts.validate()
        return opts

    def validate(self) -> None:
        # Config mistakes fail fast; only data/runtime problems become per-task errors.
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"lm_eval tasks {unknown or self.tasks} not supported; "
                             f"choose from {list(ALL_TASKS)}")
        if self.source not in SOURCES:
            raise ValueError(f"lm_eval source must be one of {SOURCES}, got {self.source!r}")

    def fewshot_for(self, task: str) -> int:
        return self.num_fewshot if self.num_fewshot is not None else DEFAULT_FEWSHOT.get(task, 0)


# ---------------------------------------------------------------- entry point

def evaluate(ctx: EvalContext, cfg: Any) -> EvalResult:
    opts = Options.from_cfg(cfg)
    if opts.source == "local":
        # Local YAMLs never need the hub; make any accidental lookup fail fast instead of hang.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if ctx.placement == "disk":
        raise ValueError("lm-eval needs the whole model in memory; placement.mode=disk keeps "
                         "one block at a time (use placement.mode=offload on GPUs, or eval=ppl)")
    if ctx.placement == "offload" and ctx.device.type == "cuda":
        with spread_over_gpus(ctx.model, ctx.spec, ctx.device_budget_bytes) as device_map:
            result = _evaluate(ctx, opts)
        result.provenance["device_map"] = sorted({str(d) for d in device_map.values()})
        return result
    return _evaluate(ctx, opts)


def _evaluate(ctx: EvalContext, opts: Options) -> EvalResult:
    result = EvalResult(provenance=_base_provenance(opts, ctx))
    lm = wrap_model(ctx.model, ctx.tokenizer, opts)
    data_dir = ctx.data_dir if ctx.data_dir is not None else resolve_data_dir()
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ptqbench-lmeval-") as tmp:
        for task in opts.tasks:
            try:
                raw[task] = _run_task(lm, task, opts, data_dir, Path(tmp), result)
            except DataMissingError as e:
                result.errors[task] = str(e)
            except Exception as e:  # noqa: BLE001 - one failing task must not lose the others
                log.exception("lm_eval task %s failed", task)
                result.errors[task] = f"{type(e).__name__}: {e}"
    _add_commonsense_avg(result)
    _save_raw(ctx.run_dir, raw, result)
    return result


def wrap_model(model, tokenizer, opts: Options):
    """HFLM around the in-memory model; log-softmax in fp32 so low-precision models compare."""
    from lm_eval.models.huggingface import HFLM

    kwargs = {"max_length": opts.max_length} if opts.max_length else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size,
                softmax_dtype="float32", **kwargs)


# ---------------------------------------------------------------- one task

def _task_manager(task: str, opts: Options, data_dir: Path | None, work_dir: Path):
    from lm_eval.tasks import TaskManager

    if opts.source == "hub":
        return TaskManager(), None
    prepared = prepare_task(task, data_dir, work_dir)
    # Index only this task's generated YAMLs: no name clash with built-ins, and fast.
    return TaskManager(include_path=str(prepared.include_dir), include_defaults=False), prepared


def _run_task(lm, task: str, opts: Options, data_dir: Path | None, work_dir: Path,
              result: EvalResult) -> dict:
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    manager, prepared = _task_manager(task, opts, data_dir, work_dir)
    out = simple_evaluate(model=lm, tasks=[task], num_fewshot=opts.fewshot_for(task),
                          limit=opts.limit, bootstrap_iters=opts.bootstrap_iters,
                          log_samples=False, task_manager=manager,
                          fewshot_random_seed=opts.fewshot_seed)
    if out is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank?)")
    seconds = time.perf_counter() - start
    if task == "mmlu":
        _collect_mmlu(out["results"], result)
    else:
        _collect(task, out["results"][task], result)
    result.provenance["tasks"][task] = _task_provenance(task, out, prepared, opts, seconds)
    return {k: out.get(k) for k in ("results", "groups", "n-samples", "configs", "versions")}


def _collect(task: str, res: dict, result: EvalResult) -> None:
    for key, prefix in _METRICS.items():
        if f"{key},none" in res:
            _put(result, f"{prefix}_{task}", res[f"{key},none"])
            _put(result, f"{prefix}_{task}_stderr", res.get(f"{key}_stderr,none"))


def _collect_mmlu(results: dict, result: EvalResult) -> None:
    names = {"mmlu": "mmlu_avg", **{f"mmlu_{c}": f"mmlu_{c}" for c in MMLU_CATEGORIES}}
    for group, name in names.items():
        res = results.get(group, {})
        _put(result, name, res.get("acc,none"))
        _put(result, f"{name}_stderr", res.get("acc_stderr,none"))
    result.artifacts["mmlu_subjects"] = {
        k.removeprefix("mmlu_"): v["acc,none"] for k, v in results.items()
        if k not in names and "acc,none" in v and _finite(v["acc,none"])}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _put(result: EvalResult, name: str, value: Any) -> None:
    """Store finite numbers only. A metric that is not (NaN, 'N/A', missing) is an error of
    the evaluation (the job is partial); a standard error that is not (too few docs) is a
    note in provenance.not_stored, the accuracy itself stands."""
    if _finite(value):
        result.metrics[name] = float(value)
        return
    why = f"not stored: lm-eval reported {value!r}"
    if name.endswith("_stderr"):
        result.provenance.setdefault("not_stored", {})[name] = why + " (e.g. too few docs)"
    else:
        result.errors[name] = why


def _add_commonsense_avg(result: EvalResult) -> None:
    ran = [t for t in COMMONSENSE_TASKS if f"acc_{t}" in result.metrics]
    if len(ran) >= 2:
        result.metrics[COMMONSENSE_AVG] = sum(result.metrics[f"acc_{t}"] for t in ran) / len(ran)
        result.provenance["commonsense_avg_tasks"] = ran


# ---------------------------------------------------------------- provenance

def _base_provenance(opts: Options, ctx: EvalContext) -> dict:
    import lm_eval
    import torch
    import transformers

    param = next(iter(ctx.model.parameters()), None)
    return {
        "lm_eval_version": lm_eval.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "source": opts.source,
        "limit": opts.limit, "num_fewshot": {t: opts.fewshot_for(t) for t in opts.tasks},
        "fewshot_seed": opts.fewshot_seed, "batch_size": opts.batch_size,
        "bootstrap_iters": opts.bootstrap_iters, "model_dtype": str(param.dtype) if param is not None else None,
        "host": platform.node(), "tasks": {},
    }


def _task_provenance(task: str, out: dict, prepared: PreparedTask | None, opts: Options,
                     seconds: float) -> dict:
    n_samples = out.get("n-samples", {})
    n_docs = sum(v.get("effective", 0) for v in n_samples.values())
    prov = {"num_fewshot": opts.fewshot_for(task), "n_docs": n_docs,
            "seconds": round(seconds, 2), "versions": out.get("versions", {}).get(task)}
    if prepared is not None:
        prov["config_sha256"] = prepared.config_sha256
        prov["data_sha256"] = prepared.data_sha256
    else:
        configs = out.get("configs", {})
        blob = json.dumps({k: configs[k] for k in sorted(configs)}, sort_keys=True, default=str)
        prov["config_sha256"] = hashlib.sha256(blob.encode()).hexdigest()
    return prov


def _save_raw(run_dir: Path | None, raw: dict, result: EvalResult) -> None:
    """Keep lm-eval's full output beside the run for debugging; failures here are not fatal."""
    if run_dir is None or not raw:
        return
    try:
        path = Path(run_dir) / "lm_eval_raw.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(raw, indent=1, default=str))
        result.artifacts["lm_eval_raw"] = str(path)
    except OSError as e:
        result.errors["lm_eval_raw"] = f"could not write raw results: {e}"
