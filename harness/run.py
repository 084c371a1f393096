"""`ptqbench`: the Hydra entry point. Thin: compose config, run one job, print a line."""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from harness.pipeline import run_one

log = logging.getLogger("ptqbench")


def _sweep_label() -> str | None:
    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    return hc.sweep.dir.rstrip("/").rsplit("/", 1)[-1] if hc.mode.name == "MULTIRUN" else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> None:
    if cfg.get("sweep") is None:
        with open_dict(cfg):
            cfg.sweep = _sweep_label()
    record = run_one(cfg)
    summary = {k: round(v, 4) for k, v in record.metrics.items() if isinstance(v, float)}
    log.info("%s %s %s %s: %s %s", record.model, record.method, record.bits, record.eval,
             record.status, record.error or summary)


if __name__ == "__main__":
    main()
