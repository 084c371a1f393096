"""Every shipped config composes through Hydra (the real conf/ tree) and builds what the
pipeline builds from it, and method YAML holds only what differs from the dataclass."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import yaml
from omegaconf import OmegaConf

from harness.evals import get_evaluator
from harness.inputs.calib import CalibSpec
from harness.inputs.models import KINDS, resolve_dtype
from harness.run.config_defaults import defaults_node
from harness.run.pipeline import Skip, build_method
from methods.base import QuantConfig
from methods.catalog import config_field_defaults, settings_value
from tests.conftest import CONF_DIR

FROM_BITS = {"w_bits", "a_bits", "group_size", "kv_bits"}   # method_base/quant.yaml sets them


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _method_cfg(compose_cfg, method: str, *more: str):
    cfg = compose_cfg(f"method={method}", "model=tiny-llama", *more)
    return OmegaConf.to_container(cfg.method, resolve=True), cfg


BITS_TO_TRY = ("w4a8", "w4a16", "w8a8", "w16a16")


@pytest.mark.parametrize("method", _options("method"))
def test_method_config_composes_and_instantiates(compose_cfg, method):
    for bits in BITS_TO_TRY:        # the first bit widths this method's config accepts
        node, cfg = _method_cfg(compose_cfg, method, f"bits={bits}")
        try:
            built = build_method(cfg.method)
            break
        except Skip:
            continue
    else:
        pytest.fail(f"method={method} builds at none of {BITS_TO_TRY}")
    assert isinstance(built.config, QuantConfig) and built.name
    # every dataclass field is a key of the composed node (overridable without '+')
    assert set(defaults_node(type(built.config))) <= set(node)
    for f in dataclasses.fields(built.config):      # ... and the config holds the node
        expected = None if f.name == "group_size" and node[f.name] == -1 else node[f.name]
        assert settings_value(getattr(built.config, f.name)) == expected, (method, f.name)


@pytest.mark.parametrize("method", _options("method"))
def test_method_yaml_holds_only_what_differs(compose_cfg, method):
    """A base method YAML restates no dataclass default; a YAML built on another method's
    (defaults: [awq]) restates none of that one's keys (pinning a default is its job)."""
    raw = yaml.safe_load((CONF_DIR / "method" / f"{method}.yaml").read_text())
    parents = [d for d in raw["defaults"] if isinstance(d, str) and "/" not in d
               and d != "_self_"]
    if parents:
        parent = yaml.safe_load((CONF_DIR / "method" / f"{parents[0]}.yaml").read_text())
        same = sorted(k for k, v in raw.items() if k not in ("defaults", "name")
                      and k in parent and parent[k] == v)
        assert not same, f"conf/method/{method}.yaml restates {parents[0]}.yaml: {same}"
        return
    assert f"/method_defaults/{raw['_target_'].rsplit('.', 1)[1]}@_here_" in raw["defaults"]
    defaults = config_field_defaults(raw["_target_"])
    restated = sorted(k for k, v in raw.items() if k in defaults and k not in FROM_BITS
                      and v == defaults[k])
    assert not restated, f"conf/method/{method}.yaml restates dataclass defaults: {restated}"


def test_cli_override_of_a_trimmed_key_needs_no_plus(compose_cfg):
    node, _ = _method_cfg(compose_cfg, "fptq", "method.v0=10", "method.gptq.damp=0.1")
    assert node["v0"] == 10 and node["gptq"]["damp"] == 0.1


@pytest.mark.parametrize("bits", _options("bits"))
def test_bits_config_composes_and_is_a_valid_quant_config(compose_cfg, bits):
    cfg = compose_cfg(f"bits={bits}", "model=tiny-llama")
    b = OmegaConf.to_container(cfg.bits, resolve=True)
    QuantConfig(w_bits=b["w_bits"], a_bits=b["a_bits"], group_size=b["group_size"])
    assert b["name"] == bits


@pytest.mark.parametrize("model", _options("model"))
def test_model_config_composes_with_a_known_source(compose_cfg, model):
    m = OmegaConf.to_container(compose_cfg(f"model={model}").model)   # local: path is ???
    assert m["source"]["kind"] in KINDS, m["source"]
    assert m["name"] or m["source"]["kind"] in ("local", "gguf")    # labelled by the path
    resolve_dtype(m["dtype"])
    assert m.get("group_size") is None or m["group_size"] % 8 == 0


@pytest.mark.parametrize("calib", _options("calib"))
def test_calib_config_composes_into_a_calib_spec(compose_cfg, calib):
    c = OmegaConf.to_container(compose_cfg(f"calib={calib}").calib, resolve=True)
    spec = CalibSpec(**{k: c[k] for k in ("dataset", "n_samples", "seqlen", "seed")})
    assert spec.n_samples > 0 and spec.seqlen > 0


@pytest.mark.parametrize("eval_name", _options("eval"))
def test_eval_config_composes_with_known_evaluators(compose_cfg, eval_name):
    e = OmegaConf.to_container(compose_cfg(f"eval={eval_name}").eval, resolve=True)
    assert e["evaluators"]
    for name in e["evaluators"]:
        assert callable(get_evaluator(name))


def _sweep_points(params: dict[str, str]) -> list[list[str]]:
    """One override list per value of each swept key (not the full product: each value
    composes and builds once)."""
    points = []
    for key, values in params.items():
        for v in str(values).split(","):
            points.append([f"{key}={v.strip()}"])
    return points or [[]]


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_experiment_config_composes_and_its_methods_build(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    raw = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()) or {}
    params = ((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    built = 0
    for point in itertools.islice(_sweep_points(params), 40):
        try:
            c = compose_cfg(f"experiment={experiment}", *point)
        except Exception as e:        # noqa: BLE001 - say which point failed
            raise AssertionError(f"experiment={experiment} {point} does not compose") from e
        try:
            build_method(c.method)
            built += 1
        except Skip:
            pass
    assert cfg.method.name and built > 0
