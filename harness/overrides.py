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
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MULTIRUN_FLAGS = ("-m", "--multirun")


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def swept_groups(args: Sequence[str], conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """{group: options} for each config group swept on the command line (`eval=a,b`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides([a for a in args if _is_override(a)]):
        group = o.key_or_group
        if o.is_sweep_override() and "." not in group and (conf_dir / group).is_dir():
            out[group] = [str(v) for v in o.sweep_string_iterator()]
    return out


def _defined_in_some_option(group: str, key: str, options: Sequence[str],
                            choices: Sequence[str], conf_dir: Path) -> bool:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for opt in options:
            try:
                cfg = compose("run", overrides=[*choices, f"{group}={opt}"])
            except Exception:   # noqa: BLE001 - Hydra reports it properly later
                continue
            if OmegaConf.select(cfg, f"{group}.{key}", default="__missing__") != "__missing__":
                return True
    return False


def lift_swept_group_keys(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """argv with `group.key=v` -> `++group.key=v` for keys of groups swept in a multirun."""
    argv = list(argv)
    if not any(a in MULTIRUN_FLAGS for a in argv):
        return argv
    swept = swept_groups(argv, conf_dir)
    if not swept:
        return argv
    # Plain group choices (model=..., experiment=...) shape what each option composes to.
    choices = [a for a in argv if _is_override(a) and "." not in a.split("=", 1)[0]
               and a.split("=", 1)[0].lstrip("+~") not in swept and "," not in a
               and (conf_dir / a.split("=", 1)[0].lstrip("+~")).is_dir()]
    for i, arg in enumerate(argv):
        if not _is_override(arg) or arg[0] in "+~":
            continue
        key = arg.split("=", 1)[0]
        group, _, rest = key.partition(".")
        if group in swept and rest and _defined_in_some_option(group, rest, swept[group],
                                                                choices, conf_dir):
            argv[i] = f"++{arg}"
            log.debug("multirun: %s -> %s (swept group %s)", arg, argv[i], group)
    return argv
