"""Hostile configs and files: no config value names code to run, secrets stay off disk,
checkpoint manifests are validated, remote code is announced and recorded."""

from __future__ import annotations

import pytest

from methods.base import ConfigError, make_config
from methods.catalog import config_field_defaults


@pytest.mark.parametrize("node", [
    {"_target_": "os.system"},
    {"_target_": "os.system", "_args_": ["touch /tmp/ptqbench-pwned"]},
    {"_target_": "subprocess.run"},
    {"_target_": "methods.base.build"},                        # in methods, not a config
    {"_target_": "methods.rtn.RTNConfig", "_args_": [1]},
    {"_target_": "methods.rtn.RTNConfig", "keep_fp": [{"_target_": "os.system"}]},
    {"_target_": "methods..rtn.RTNConfig"},
    {"_target_": "methods.nope.NoConfig"},
])
def test_method_target_outside_the_methods_configs_is_refused(node, monkeypatch):
    import importlib
    real = importlib.import_module
    imported = []

    def spy(name, *a, **k):
        imported.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", spy)
    with pytest.raises(ConfigError):
        make_config(node)
    assert all(n.startswith("methods") for n in imported), imported
    assert config_field_defaults(node["_target_"]) is None or node["_target_"].startswith(
        "methods.rtn")


def test_method_target_builds_the_config_without_calling_anything_else():
    from methods.rtn import RTNConfig
    cfg = make_config({"_target_": "methods.rtn.RTNConfig", "w_bits": 4, "group_size": 64})
    assert isinstance(cfg, RTNConfig) and cfg.w_bits == 4 and cfg.group_size == 64
    with pytest.raises(ConfigError, match="not a setting"):
        make_config({"_target_": "methods.rtn.RTNConfig", "bogus": 1})


def test_method_target_os_system_through_the_pipeline_runs_nothing(compose_cfg, tmp_path):
    from conftest import TINY_QUICK

    from harness.run.pipeline import run_one
    marker = tmp_path / "pwned"
    cfg = compose_cfg(*TINY_QUICK, "method=rtn", "method._target_=os.system",
                      f"+method._args_=[touch {marker}]")
    record = run_one(cfg)
    assert record.status in ("failed", "skipped") and "methods package" in str(record.error)
    assert not marker.exists()
