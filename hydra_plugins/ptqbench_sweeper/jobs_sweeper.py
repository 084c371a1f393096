"""JobListSweeper: BasicSweeper whose job list is (command-line sweep points) x (the
composed config's `jobs:` entries); without `jobs` it is the basic sweeper."""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf

from harness.run.jobs import expand, job_list


class JobListSweeper(BasicSweeper):
    def split_arguments(self, overrides: list[Any],          # type: ignore[override]
                        max_batch_size: int | None) -> list[list[list[str]]]:
        (points,) = BasicSweeper.split_arguments(overrides, None)
        jobs = self.config.get("jobs") if self.config is not None else None
        raw = None if jobs is None else OmegaConf.to_container(jobs, resolve=False)
        return list(BasicSweeper.split_overrides_to_chunks(expand(points, job_list(raw)),
                                                           max_batch_size))
