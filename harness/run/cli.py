"""`ptqbench`: the Hydra entry point. Thin: compose config, run one job, print a line."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from harness.run.callbacks import require_launcher_plugin, write_job_status
from harness.run.config_defaults import register_invocation_resolver, register_method_defaults
from harness.run.overrides import lift_swept_group_keys
from harness.run.pipeline import RunsDirError, run_one
from harness.util.security import install_log_redaction, override_secrets

log = logging.getLogger("ptqbench")
register_method_defaults()   # conf/method/*.yaml compose onto the dataclass defaults
register_invocation_resolver()   # hydra.run.dir / hydra.sweep.dir: one folder per invocation


def _sweep_label() -> str | None:
    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    return hc.sweep.dir.rstrip("/").rsplit("/", 1)[-1] if hc.mode.name == "MULTIRUN" else None


def _output_dir() -> str | None:
    try:
        return HydraConfig.get().runtime.output_dir
    except ValueError:
        return None


@hydra.main(version_base="1.3", config_path="../../conf", config_name="run")
def hydra_main(cfg: DictConfig) -> None:
    if cfg.get("jobs") is not None and _sweep_label() is None:
        log.error("this experiment lists %d jobs (`jobs:`); run them with -m "
                  "(ptqbench -m experiment=...)", len(cfg.jobs))
        raise SystemExit(2)
    if cfg.get("sweep") is None:
        with open_dict(cfg):
            cfg.sweep = _sweep_label()
    try:
        record = run_one(cfg)
    except RunsDirError as e:     # nothing ran: no job can keep its result
        log.error("%s", e)
        raise SystemExit(2) from None
    resumed = bool(record.provenance.get("resumed"))
    out = _output_dir()
    if out:
        write_job_status(out, record, resumed)
    summary = {k: round(v, 4) for k, v in record.metrics.items() if isinstance(v, float)}
    log.info("%s %s %s %s: %s%s %s", record.model, record.method, record.bits, record.eval,
             record.status, " (resumed: finished before)" if resumed else "",
             record.error or summary)


def main() -> None:
    install_log_redaction(override_secrets(sys.argv[1:]))   # Hydra logs each job's overrides
    require_launcher_plugin(sys.argv[1:])
    sys.argv[1:] = lift_swept_group_keys(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
