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

# Norm gains that inject activation outliers into the tiny llama (methods like SmoothQuant,
# AWQ, QuaRot are only distinguishable from RTN when such channels exist).
TINY_OUTLIERS = {"0.post_attention_layernorm": 50.0, "1.input_layernorm": 30.0}


def tiny_outlier_setup(n_calib: int = 4, seq_len: int = 64, n_test: int = 2):
    """(model, spec, calib, test): tiny llama with TINY_OUTLIERS, seeded token batches.

    calib: n_calib tensors [1, seq_len]; test: [n_test, seq_len], drawn after calib.
    """
    from harness.inputs.models import tiny_llama
    from methods.arch import ModelSpec

    model = tiny_llama(outliers=TINY_OUTLIERS).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 320, (1, seq_len), generator=gen) for _ in range(n_calib)]
    test = torch.randint(0, 320, (n_test, seq_len), generator=gen)
    return model, ModelSpec.from_model(model, "tiny"), calib, test


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: thread hand-offs dominate on a shared CPU; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
