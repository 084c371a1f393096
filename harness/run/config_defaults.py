"""Method settings have one source of defaults: the config dataclasses.

Every registered method config class is stored in Hydra's ConfigStore as
`method_defaults/<ClassName>`, a node of {field: default} read from the dataclass, and each
conf/method/*.yaml puts it first in its defaults list:

    defaults:
      - /method_defaults/FPTQConfig@_here_     # every field at its dataclass default
      - /method_base/quant@_here_              # the bits group's widths, shared settings
      - _self_
    _target_: methods.fptq.FPTQConfig
    v1: 150.0                                  # only what differs from the dataclass

So the YAML holds overrides only, every field is still a key of the composed config
(`method.v0=10` on the command line needs no `+`) and records store every setting a job ran
with. Call `register_method_defaults()` before composing (the CLI and tests do).

Hydra's output directories (conf/run.yaml: hydra.run.dir, hydra.sweep.dir) end in
`${ptqbench.invocation:}`, which `register_invocation_resolver()` provides: the time stamp
alone would put two identical sweeps started in the same second into one folder.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from methods.base import registered_configs
from methods.catalog import config_field_defaults, load_builtin

GROUP = "method_defaults"


def defaults_node(config_cls: type) -> dict[str, Any]:
    """{field: default} of a method config class, as the composed config holds it."""
    fields = config_field_defaults(f"{config_cls.__module__}.{config_cls.__qualname__}") or {}
    return {k: v for k, v in fields.items() if v is not dataclasses.MISSING}


@functools.cache
def register_method_defaults() -> dict[str, str]:
    """Store `method_defaults/<ClassName>` for every registered method config class;
    returns {ClassName: dotted path}. Idempotent."""
    load_builtin()
    names: dict[str, str] = {}
    store = ConfigStore.instance()
    for cls in registered_configs():
        path = f"{cls.__module__}.{cls.__qualname__}"
        if names.get(cls.__name__, path) != path:
            raise RuntimeError(f"two method config classes are named {cls.__name__} "
                               f"({names[cls.__name__]}, {path}); rename one")
        names[cls.__name__] = path
        store.store(group=GROUP, name=cls.__name__, node=defaults_node(cls))
    return names


INVOCATION_RESOLVER = "ptqbench.invocation"


def invocation_id() -> str:
    """`<pid>-<6 random hex>`: distinct for two processes on one host (pid) and, with
    the random part, across hosts sharing a results directory."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def register_invocation_resolver() -> None:
    """`${ptqbench.invocation:}`. Cached per config like Hydra's `${now:}`: Hydra copies the
    cache into every job's config (also to launcher processes), so all jobs of one sweep
    resolve the same directory and each invocation gets its own. Idempotent."""
    if not OmegaConf.has_resolver(INVOCATION_RESOLVER):
        OmegaConf.register_new_resolver(INVOCATION_RESOLVER, invocation_id, use_cache=True)
