"""Shared fixtures: the real Hydra configs composed with tiny overrides, tiny random llama."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose(overrides: list[str], results_dir: Path):
    """The real conf/run.yaml composed with overrides; outputs under results_dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from harness.run.config_defaults import register_method_defaults

    register_method_defaults()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("run", overrides=[f"paths.results_dir={results_dir}",
                                              f"paths.cache_dir={results_dir}/cache", *overrides])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    return lambda *overrides: compose(list(overrides), tmp_path / "results")


@pytest.fixture(scope="session")
def data_dir():
    from harness.inputs.data import resolve_data_dir
    d = resolve_data_dir()
    if d is None:
        pytest.skip("data directory (../shared/data or PTQBENCH_DATA_DIR) not found")
    return d


TINY_QUICK = ["model=tiny-llama", "calib=random-tokens", "eval=ppl-quick", "eval.max_windows=2",
              "eval.seqlen=128", "eval.datasets=[ptb]"]
