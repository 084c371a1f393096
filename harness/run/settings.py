"""One validation layer for the non-method config groups (the method group validates itself
in its QuantConfig dataclass).

`settings_from(cfg)` reads the composed Hydra config once, before any work, into frozen
typed dataclasses. Every bad value raises `ConfigError` naming the key, the value, the
allowed range and what to do; nothing is coerced or silently reinterpreted (0 windows is
not "all windows", "abc" is not a group size, a missing data directory is not "use the
default one").
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from harness.evals import EVALUATORS
from harness.inputs.data import CALIB_SOURCES, EVAL_TEXT_SOURCES, resolve_data_dir
from harness.run.overrides import CONF_DIR
from harness.util.security import is_secret_key
from methods.base import ConfigError

TRACKING_KINDS = ("none", "wandb")
LM_EVAL_SOURCES = ("local", "hub")


def bad(key: str, value: Any, allowed: str, todo: str = "") -> ConfigError:
    """ConfigError('<key>=<value>: allowed <range>. <what to do>')."""
    return ConfigError(f"{key}={value!r} is not valid: allowed {allowed}."
                       + (f" {todo}" if todo else ""))


def as_int(key: str, value: Any, minimum: int, *, optional: bool = False,
           none_means: str = "") -> int | None:
    """`value` as an int >= minimum (None when optional); never a bool, float or text."""
    if value is None and optional:
        return None
    allowed = f"an integer >= {minimum}" + (f", or null ({none_means})" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad(key, value, allowed, f"e.g. {key}={max(minimum, 1)}")
    if value < minimum:
        raise bad(key, value, allowed,
                  f"use {key}=null for {none_means}" if optional and none_means else "")
    return value


def as_int_list(key: str, value: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise bad(key, value, f"a list of integers >= {minimum}", f"e.g. {key}=[{minimum}]")
    out = tuple(as_int(f"{key}[{i}]", v, minimum) for i, v in enumerate(value))
    if not out:
        raise bad(key, [], f"a non-empty list of integers >= {minimum}")
    return out


def as_choice(key: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise bad(key, value, f"one of {', '.join(choices)}")
    return value


def as_bool(key: str, value: Any) -> bool:
    """A YAML boolean only: `yes`, `1`, `maybe` given for a switch are errors, not truthy."""
    if not isinstance(value, bool):
        raise bad(key, value, "true or false", f"e.g. {key}=true")
    return value


def as_choices(key: str, value: Any, choices: Iterable[str]) -> tuple[str, ...]:
    choices = tuple(choices)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not value:
        raise bad(key, value, f"a non-empty list from {', '.join(choices)}")
    return tuple(as_choice(f"{key}[{i}]", v, choices) for i, v in enumerate(value))


# eval key -> (minimum, null allowed, what null means). Keys an eval config does not set
# are not checked; an evaluator reading a key reads a validated value.
EVAL_INTS: dict[str, tuple[int, bool, str]] = {
    "seqlen": (2, False, ""),
    "max_windows": (1, True, "every window"),
    "batch_size": (1, False, ""),
    "limit": (1, True, "every document"),
    "num_fewshot": (0, True, "the task's default"),
    "fewshot_seed": (0, False, ""),
    "calib_samples": (1, True, "every calibration sample"),
    "top_k_channels": (1, False, ""),
    "n_worst": (1, False, ""),
    "decode_prompt_len": (1, False, ""),
    "new_tokens": (1, False, ""),
    "warmup": (0, False, ""),
    "repeats": (1, False, ""),
    "seed": (0, False, ""),
}
EVAL_INT_LISTS = {"prompt_lens": 1, "batches": 1, "decode_batches": 1}


@dataclass(frozen=True)
class EvalSettings:
    name: str
    evaluators: tuple[str, ...]
    ints: Mapping[str, int | None]
    datasets: tuple[str, ...] = ()       # ppl
    dataset: str | None = None           # distributions / sensitivity
    tasks: tuple[str, ...] = ()          # lm_eval
    source: str = "local"                # lm_eval

    @property
    def seqlen(self) -> int | None:
        return self.ints.get("seqlen")

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> EvalSettings:
        evaluators = as_choices("eval.evaluators", node.get("evaluators"), EVALUATORS)
        ints = {k: as_int(f"eval.{k}", node[k], lo, optional=opt, none_means=means)
                for k, (lo, opt, means) in EVAL_INTS.items() if k in node}
        for k, lo in EVAL_INT_LISTS.items():
            if k in node:
                as_int_list(f"eval.{k}", node[k], lo)
        datasets = (as_choices("eval.datasets", node.get("datasets"), EVAL_TEXT_SOURCES)
                    if "ppl" in evaluators else ())
        dataset = (as_choice("eval.dataset", node.get("dataset"), EVAL_TEXT_SOURCES)
                   if {"distributions", "sensitivity"} & set(evaluators) else None)
        tasks: tuple[str, ...] = ()
        source = "local"
        if "lm_eval" in evaluators:
            source = as_choice("eval.source", node.get("source", "local"), LM_EVAL_SOURCES)
            tasks = _lm_eval_tasks(node.get("tasks"), source)
        for ev in evaluators:
            if ev in ("ppl", "distributions", "sensitivity") and "seqlen" not in ints:
                raise bad("eval.seqlen", None, "an integer >= 2", f"evaluator {ev} needs it")
        return cls(str(node.get("name")), evaluators, ints, datasets, dataset, tasks, source)


def _lm_eval_tasks(value: Any, source: str) -> tuple[str, ...]:
    if source == "hub":   # lm-eval's own task names: lm-eval itself reports unknown ones
        if isinstance(value, str):
            value = [value]
        if not value or not all(isinstance(t, str) and t for t in value):
            raise bad("eval.tasks", value, "a non-empty list of lm-eval task names")
        return tuple(value)
    from harness.evals.tasks import ALL_TASKS
    return as_choices("eval.tasks", value, ALL_TASKS)


@dataclass(frozen=True)
class CalibSettings:
    dataset: str
    n_samples: int
    seqlen: int
    seed: int

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> CalibSettings:
        return cls(as_choice("calib.dataset", node.get("dataset"), CALIB_SOURCES),
                   as_int("calib.n_samples", node.get("n_samples"), 1),
                   as_int("calib.seqlen", node.get("seqlen"), 2),
                   as_int("calib.seed", node.get("seed"), 0))


@dataclass(frozen=True)
class RunSettings:
    seed: int
    eval: EvalSettings
    calib: CalibSettings
    tracking_kind: str
    data_dir: Path | None
    runs_dir: Path


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers; a missing mandatory value (`???`) or an
    interpolation that does not resolve becomes a ConfigError naming the key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = e.full_key or "?"
        hint = (" model=local reads a saved checkpoint: add model.source.path=/path/to/ckpt"
                if key == "model.source.path" else "")
        raise ConfigError(f"{key} is required and not set ('???' in its config);"
                          f" set it on the command line: {key}=...{hint}") from None
    except InterpolationResolutionError as e:
        raise ConfigError(f"{e.full_key or '?'}: {e.msg if hasattr(e, 'msg') else e}") from None


# on/off switches a job reads: (group, key) -> default when the key is absent
SWITCHES: dict[tuple[str | None, str], bool] = {
    (None, "force"): False, (None, "rerun_failed"): True, (None, "runtime"): False,
    (None, "save_checkpoint"): False, (None, "calib_allow_hub"): False,
    (None, "runtime_fuse"): False, ("model", "trust_remote_code"): False,
    ("eval", "allow_hub"): False, ("cache", "enabled"): True, ("cache", "verify"): True,
}


def check_switches(full: Mapping[str, Any]) -> None:
    """Every switch is a boolean and `export` names a format: a switch given as text
    (`rerun_failed=no`) would be truthy, an unknown export would only fail after the work."""
    from methods.export import FORMATS
    for (group, key), default in SWITCHES.items():
        node = full if group is None else (full.get(group) or {})
        as_bool(key if group is None else f"{group}.{key}", node.get(key, default))
    if full.get("export") is not None:
        as_choice("export", full["export"], FORMATS)


# keys a job reads that no shipped config file sets (documented where they are read)
EXTRA_KEYS: dict[str | None, frozenset[str]] = {
    None: frozenset({"runtime_fuse"}),
    "eval": frozenset({*EVAL_INTS, *EVAL_INT_LISTS, "decode_mode"}),
}
CHECKED_GROUPS = ("eval", "calib", "cache", "placement")


@functools.cache
def known_keys(group: str | None) -> frozenset[str]:
    """The keys `group` may hold: those any conf/<group>/*.yaml sets, plus EXTRA_KEYS
    (group None: the top level of conf/run.yaml and its config groups)."""
    run = OmegaConf.load(CONF_DIR / "run.yaml")
    if group is None:
        groups = {next(iter(d)) for d in run.defaults if isinstance(d, Mapping)}
        keys = set(run.keys()) - {"defaults", "hydra"} | groups
    elif group in run:                      # a node of run.yaml itself (placement)
        keys = set(run[group].keys())
    else:                                   # a config group: conf/<group>/*.yaml
        keys = {k for f in (CONF_DIR / group).glob("*.yaml")
                for k in (OmegaConf.load(f) or {}).keys() if k != "defaults"}
    return frozenset(keys | EXTRA_KEYS.get(group, frozenset()))


def check_known_keys(full: Mapping[str, Any]) -> None:
    """A key no config defines (a typo such as `+eval.max_window=2`) is an error: it would
    be accepted by Hydra's `+` and then silently ignored. Secret-looking keys (`+hf_token=`)
    pass: they are credentials for libraries, redacted everywhere."""
    nodes = {None: full, **{g: full.get(g) for g in CHECKED_GROUPS}}
    for group, node in nodes.items():
        if not isinstance(node, Mapping):
            continue
        known = known_keys(group)
        for key in node:
            if key not in known and not is_secret_key(str(key)):
                name = key if group is None else f"{group}.{key}"
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ConfigError(f"{name} is not a setting ptqbench reads (known: "
                                  f"{', '.join(sorted(known))}); {hint}a misspelt key would "
                                  "be silently ignored, so it is refused.")


def settings_from(cfg: DictConfig) -> RunSettings:
    """Validate every non-method setting a job reads (ConfigError on the first bad one)."""
    full = resolved_config(cfg)
    check_known_keys(full)
    seed = as_int("seed", full.get("seed"), 0)
    check_switches(full)
    tracking = full.get("tracking") or {}
    kind = as_choice("tracking.kind", tracking.get("kind", "none"), TRACKING_KINDS)
    paths = full.get("paths") or {}
    return RunSettings(seed=seed,
                       eval=EvalSettings.from_node(full.get("eval") or {}),
                       calib=CalibSettings.from_node(full.get("calib") or {}),
                       tracking_kind=kind,
                       data_dir=checked_data_dir(paths.get("data_dir")),
                       runs_dir=Path(str(paths.get("runs_dir"))))


def checked_data_dir(configured: Any) -> Path | None:
    """resolve_data_dir, but a data directory that was asked for and does not exist is an
    error (never a silent fall back to another directory)."""
    from harness.inputs.data import ENV_VAR, DataMissingError
    try:
        return resolve_data_dir(configured)
    except DataMissingError as e:
        key = ENV_VAR if os.environ.get(ENV_VAR) else "paths.data_dir"
        raise ConfigError(f"{key}: {e}") from None
