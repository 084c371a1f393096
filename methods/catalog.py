"""The method catalog: what the harness asks of methods without naming one.

    method = build(RTNConfig(w_bits=4))       # the Method registered for the config's type
    available()                               # ["awq", "fp16", "fptq", ...]
    config_field_defaults("methods.rtn.RTNConfig")   # {field: default}, for old records

Layering: catalog -> method modules (rtn, gptq, ...) -> base. A method module registers its
class for its config type with `methods.base.register` when imported; the catalog imports
the built-in ones (BUILTIN_METHODS) so `available()` lists them. A config built from its
class has already imported the class's module, so `build` needs no list for methods whose
Method class lives next to its config.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

from methods.base import (
    ConfigError,
    Method,
    QuantConfig,
    config_class,
    method_for,
    registered_methods,
)

# methods/<name>.py modules that register a method. Optional ones may be missing from a
# build (e.g. a trimmed install); a module that exists but fails to import raises.
BUILTIN_METHODS = ("fp16", "rtn", "smoothquant", "gptq", "awq", "fptq", "llmqat", "quip",
                   "quarot", "baselines", "baseline_gptqmodel")


@functools.cache
def load_builtin() -> None:
    for name in BUILTIN_METHODS:
        try:
            importlib.import_module(f"methods.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"methods.{name}":
                raise


def build(config: QuantConfig) -> Method:
    cls = method_for(type(config))
    if cls is None:
        load_builtin()
        cls = method_for(type(config))
    if cls is None:
        raise ConfigError(f"no method registered for {type(config).__name__}; "
                          f"available: {available()}")
    return cls(config)


def available() -> list[str]:
    load_builtin()
    return sorted(m.name for m in registered_methods())


def settings_value(value: Any) -> Any:
    """A config value as a settings node holds it: sub-configs as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: settings_value(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [settings_value(v) for v in value]
    return value


@functools.cache
def config_field_defaults(target: str) -> dict[str, Any] | None:
    """{field: default} of the config dataclass at dotted path `target` (a Hydra
    `_target_`), as a settings node holds it (`settings_value`; default_factory fields
    built); dataclasses.MISSING for fields without a default. None when the path names no
    QuantConfig of the methods package (a renamed class, a foreign target: never imported)."""
    try:
        cls = config_class(target)
    except ConfigError:
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = settings_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = settings_value(f.default_factory())
        else:
            out[f.name] = dataclasses.MISSING
    return out


def upgrade_settings(node: dict[str, Any]) -> dict[str, Any]:
    """A stored method settings node in its config class's current field names (see
    QuantConfig.upgrade_settings); unchanged when `_target_` names no methods config."""
    try:
        cls = config_class(node.get("_target_"))
    except ConfigError:
        return node
    return cls.upgrade_settings(node)
