"""Explicit job lists (`jobs:`, harness/run/jobs.py) and the sweeper that expands them
(hydra_plugins/ptqbench_sweeper): the demo experiment composes to exactly its jobs."""

from __future__ import annotations

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from harness.run.callbacks import sweep_size
from harness.run.jobs import expand, job_list
from harness.run.pipeline import build_method
from methods.base import ConfigError
from tests.conftest import CONF_DIR
from tests.test_sweeps import _cmd, _records, _run

SWEEPER = yaml.safe_load((CONF_DIR / "run.yaml").read_text())["hydra"]["sweeper"]["_target_"]
DEMO_PAIRS = [("fp16", "w16a16"), ("rtn", "w4a8"), ("rtn", "w4a8"), ("smoothquant", "w4a8"),
              ("gptq", "w4a8"), ("awq", "w4a8"), ("fptq", "w4a8"), ("gptq", "w4a16")]


def _demo_jobs() -> list[list[str]]:
    raw = yaml.safe_load((CONF_DIR / "experiment" / "demo.yaml").read_text())
    return job_list(raw["jobs"])


def test_job_entries_become_overrides_in_order():
    jobs = job_list([{"method": "rtn", "bits": "w4a8", "method.act_mode": "static_tensor"},
                     {"method": "fp16", "eval.datasets": ["ptb", "wikitext2"], "force": True,
                      "+x": None}])
    assert jobs == [["method=rtn", "bits=w4a8", "method.act_mode=static_tensor"],
                    ["method=fp16", "eval.datasets=[ptb,wikitext2]", "force=true", "+x=null"]]
    assert job_list(None) == []


@pytest.mark.parametrize("bad", [[], "rtn", {"method": "rtn"}, [{}], ["method=rtn"],
                                 [{"method": {"name": "rtn"}}], [{"a=b": 1}]])
def test_malformed_job_lists_say_what_to_write(bad):
    with pytest.raises(ConfigError, match="jobs"):
        job_list(bad)


def test_expand_is_points_times_jobs_with_the_command_line_last():
    points = [["seed=0", "experiment=demo"], ["seed=1", "experiment=demo"]]
    out = expand(points, [["method=fp16"], ["method=rtn", "bits=w4a8"]])
    assert out == [["method=fp16", "seed=0", "experiment=demo"],
                   ["method=rtn", "bits=w4a8", "seed=0", "experiment=demo"],
                   ["method=fp16", "seed=1", "experiment=demo"],
                   ["method=rtn", "bits=w4a8", "seed=1", "experiment=demo"]]
    assert expand(points, []) == points


def test_demo_experiment_composes_to_exactly_its_jobs(compose_cfg):
    """Each job composes with the real conf tree, runs the (method, bits) it names with its
    settings, and builds its method config; only meaningful pairs, no product."""
    jobs = _demo_jobs()
    seen = []
    for job in jobs:
        cfg = compose_cfg("experiment=demo", *job)
        assert cfg.model.name == "smollm2-135m" and cfg.eval.name == "ppl-quick"
        assert (cfg.eval.max_windows, cfg.eval.seqlen) == (4, 512) and cfg.calib.n_samples == 8 and cfg.calib.seqlen == 512
        assert cfg.jobs is not None and len(cfg.jobs) == len(jobs) and cfg.sweep == "demo"
        seen.append((cfg.method.name, cfg.bits.name))
        qcfg = build_method(cfg.method).config
        if cfg.method.name == "rtn":
            assert qcfg.act_mode == ("static_tensor" if "method.act_mode=static_tensor" in job
                                     else "dynamic_token")
        if cfg.method.name == "awq":
            assert (qcfg.n_grid, qcfg.clip_n_grid, qcfg.clip_n_tokens) == (10, 10, 256)
        if cfg.bits.name != "w16a16":
            assert qcfg.w_bits == 4 and qcfg.a_bits == int(cfg.bits.name[-2:].lstrip("a"))
    assert seen == DEMO_PAIRS


def test_sweeper_expands_the_demo_jobs_and_counts_them(compose_cfg):
    cfg = compose_cfg("experiment=demo")
    # the class as Hydra loads it (its plugin scan re-imports the sweeper modules)
    sweeper = Plugins.instance().class_name_to_class[SWEEPER](max_batch_size=3)
    sweeper.config = cfg
    overrides = OverridesParser.create().parse_overrides(["experiment=demo", "seed=0,1"])
    batches = sweeper.split_arguments(overrides, 3)
    flat = [job for batch in batches for job in batch]
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 1]
    assert flat[:8] == [[*job, "experiment=demo", "seed=0"] for job in _demo_jobs()]
    assert flat[8:] == [[*job, "experiment=demo", "seed=1"] for job in _demo_jobs()]
    sized = OmegaConf.create({"jobs": OmegaConf.to_container(cfg.jobs), "hydra": {
        "sweeper": {"params": None}, "overrides": {"task": ["experiment=demo", "seed=0,1"]}}})
    assert sweep_size(sized) == 16


def test_cli_multirun_runs_the_listed_jobs_only(tmp_path):
    res = tmp_path / "res"
    out = _run(_cmd(res, "jobs=[{method:fp16,bits:w16a16},{method:rtn,bits:w4a8}]"))
    assert sorted((r["method"], r["bits"]) for r in _records(res)) == [
        ("fp16", "w16a16"), ("rtn", "w4a8")]
    assert all(r["status"] == "ok" for r in _records(res))
    assert "sweep: 2 jobs" in out.stdout + out.stderr


def test_cli_single_run_of_a_job_list_asks_for_multirun(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO
    cmd = [sys.executable, "-m", "harness.run.cli", "jobs=[{method:fp16}]",
           f"paths.results_dir={tmp_path}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "run them with -m" in out.stdout + out.stderr
