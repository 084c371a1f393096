"""Command-line overrides that Hydra's multirun would reject before any job runs.

In a multirun Hydra first composes the primary config with the *default* choice of every
swept group, so `-m method=fp16,fptq bits=... eval=commonsense,mmlu eval.limit=5` fails: the
default `eval=ppl` has no `limit`. A key of a swept group is rewritten to `++group.key=value`
(override or add) when at least one of the swept options defines it; a key no option defines
is left alone, so Hydra still reports typos.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("ptqbench")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MULTIRUN_FLAGS = ("-m", "--multirun")


_ABSENT = object()


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _key(arg: str) -> str:
    """`++eval.limit=5` -> `eval.limit`."""
    return arg.split("=", 1)[0].lstrip("+~")


def swept_groups(args: Sequence[str], conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """{group: options} for each config group swept on the command line (`eval=a,b`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides([a for a in args if _is_override(a)]):
        group = o.key_or_group
        if o.is_sweep_override() and "." not in group and (conf_dir / group).is_dir():
            out[group] = [str(v) for v in o.sweep_string_iterator()]
    return out


def _option_configs(group: str, options: Sequence[str], choices: Sequence[str],
                    conf_dir: Path) -> list:
    """The `group` node of the config each swept option composes to (with the other group
    choices of the command line); an option that does not compose is left to Hydra."""
    from hydra import compose, initialize_config_dir

    from harness.run.config_defaults import register_method_defaults

    register_method_defaults()
    nodes = []
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for opt in options:
            try:
                nodes.append(compose("run", overrides=[*choices, f"{group}={opt}"])[group])
            except Exception:   # noqa: BLE001 - Hydra reports it properly later
                continue
    return nodes


def lift_swept_group_keys(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """argv with `group.key=v` -> `++group.key=v` for keys of groups swept in a multirun."""
    from omegaconf import OmegaConf

    argv = list(argv)
    if not any(a in MULTIRUN_FLAGS for a in argv):
        return argv
    swept = swept_groups(argv, conf_dir)
    if not swept:
        return argv
    # Plain group choices (model=..., experiment=...) shape what each option composes to.
    choices = [a for a in argv if _is_override(a) and "." not in _key(a) and "," not in a
               and _key(a) not in swept and (conf_dir / _key(a)).is_dir()]
    composed: dict[str, list] = {}      # group -> its options' nodes, composed once
    for i, arg in enumerate(argv):
        if not _is_override(arg) or arg[0] in "+~":
            continue
        group, _, rest = _key(arg).partition(".")
        if group not in swept or not rest:
            continue
        if group not in composed:
            composed[group] = _option_configs(group, swept[group], choices, conf_dir)
        if any(OmegaConf.select(node, rest, default=_ABSENT) is not _ABSENT
               for node in composed[group]):
            argv[i] = f"++{arg}"
            log.debug("multirun: %s -> %s (swept group %s)", arg, argv[i], group)
    return argv
