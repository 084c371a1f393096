"""Explicit job lists: an experiment's `jobs:` key names the (method, bits, ...) points to
run instead of the cartesian product of swept groups.

    jobs:
      - {method: fp16, bits: w16a16}
      - {method: rtn, bits: w4a8, method.act_mode: static_tensor}

Each entry is a mapping of override key -> value (a group choice such as `method`, or a
dotted key). The sweeper (hydra_plugins/ptqbench_sweeper) launches one job per entry and
per point of any command-line sweep; the command line wins over an entry for the same key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from harness.run.settings import bad

_SCALARS = (str, int, float, bool)


def _value(key: str, value: Any) -> str:
    """A YAML scalar as Hydra override text (true/false/null as Hydra spells them)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _SCALARS):
        return str(value)
    if isinstance(value, Sequence):     # a list value: [a,b]
        return "[" + ",".join(_value(key, v) for v in value) + "]"
    raise bad(f"jobs.{key}", value, "a scalar or a list of scalars",
              "write nested keys dotted (method.act_mode: static_tensor)")


def job_overrides(job: Any, index: int) -> list[str]:
    """One `jobs:` entry -> Hydra override strings, in the entry's order."""
    if not isinstance(job, Mapping) or not job:
        raise bad(f"jobs[{index}]", job, "a non-empty mapping of override key -> value",
                  "e.g. {method: rtn, bits: w4a8}")
    out = []
    for key, value in job.items():
        if not isinstance(key, str) or not key.lstrip("+~") or "=" in key:
            raise bad(f"jobs[{index}]", key, "an override key (method, bits, eval.max_windows)")
        out.append(f"{key}={_value(key, value)}")
    return out


def job_list(jobs: Any) -> list[list[str]]:
    """The `jobs:` key -> one override list per job ([] when the key is unset)."""
    if jobs is None:
        return []
    if isinstance(jobs, (str, Mapping)) or not isinstance(jobs, Sequence) or not jobs:
        raise bad("jobs", jobs, "a non-empty list of mappings", "or leave `jobs` unset (null)")
    return [job_overrides(j, i) for i, j in enumerate(jobs)]


def expand(points: Sequence[Sequence[str]], jobs: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each command-line sweep point x each job; the point's overrides come last so the
    command line wins over an entry for the same key. No jobs: the points unchanged."""
    if not jobs:
        return [list(p) for p in points]
    return [[*job, *point] for point in points for job in jobs]
