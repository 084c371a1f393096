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


def _all_text_under(root) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("multirun", [False, True])
def test_command_line_secrets_never_reach_hydra_files_logs_or_records(tmp_path, multirun):
    import subprocess
    import sys

    from conftest import REPO, TINY_QUICK
    res = tmp_path / "res"
    secret, token = "sk-SECRET-abc123xyz", "hf_TOKENVALUE987"
    cmd = [sys.executable, "-m", "harness.run.cli", *(["-m"] if multirun else []),
           *TINY_QUICK, "eval.max_windows=1", "method=fp16",
           *(["bits=w16a16,w8a16"] if multirun else []),
           f"paths.results_dir={res}", f"paths.cache_dir={res}/cache",
           f"+tracking.api_key={secret}", f"+hf_token={token}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = _all_text_under(res) + out.stdout + out.stderr
    assert secret not in text and token not in text
    hydra_files = sorted(p.name for p in (res / "hydra").rglob("*.yaml"))
    assert {"config.yaml", "hydra.yaml", "overrides.yaml"} <= set(hydra_files)
    if multirun:
        assert "multirun.yaml" in hydra_files
    overrides = next((res / "hydra").rglob("overrides.yaml")).read_text()
    assert "+tracking.api_key=***redacted***" in overrides and "method=fp16" in overrides


# ---------------------------------------------------------------- checkpoint manifests


def _checkpoint(tmp_path):
    from methods.arch import ModelSpec
    from methods.checkpoint import save_runtime_checkpoint
    from methods.rtn import RTNConfig
    from tests.test_runtime import runtime_of, simulated
    rt = runtime_of(*simulated(RTNConfig(w_bits=4, a_bits=8, group_size=32,
                                         act_mode="dynamic_token")))[0]
    return save_runtime_checkpoint(rt, ModelSpec.from_model(rt, "tiny-llama"), tmp_path / "ck")


def _edit(cfg, where, value):
    keys = where.split("/")
    node = cfg
    for k in keys[:-1]:
        node = node[k] if not isinstance(node, dict) or k in node else next(iter(node.values()))
    node[keys[-1]] = value


@pytest.mark.parametrize("where,value,match", [
    ("tensors", "/etc/passwd", "tensors"),
    ("tensors", "../outside.safetensors", "tensors"),
    ("tensors", "link.safetensors", "link out of it"),
    ("model/dtype", "os.system", "model.dtype"),
    ("format_version", "3; rm -rf /", "format_version"),
    ("sha256", ["x"], "sha256"),
    ("linears/*/kind", "Module", "kind"),
    ("linears/*/in_features", -5, "in_features"),
    ("linears/*/in_features", 1 << 40, "in_features"),
    ("linears/*/w_bits", "4", "w_bits"),
    ("linears/*/act_mode", "exec", "act_mode"),
    ("linears/*/act_scale", float("nan"), "act_scale"),
    ("linears/*/dtypes", {"w_scale": "float128"}, "dtypes"),
    ("linears/*/bias", "yes", "bias"),
    ("linears", ["a"], "linears"),
    ("model/hf_config", "llama", "hf_config"),
])
def test_checkpoint_manifest_values_come_from_allowlists(tmp_path, where, value, match):
    import json

    from methods.checkpoint import CheckpointError, load_runtime_checkpoint
    path = _checkpoint(tmp_path)
    if value == "link.safetensors":
        (tmp_path / "outside.safetensors").write_bytes(b"x")
        (path / value).symlink_to(tmp_path / "outside.safetensors")
    cfg_file = path / "ptq_runtime.json"
    cfg = json.loads(cfg_file.read_text())
    if where.startswith("linears/*/"):
        next(iter(cfg["linears"].values()))[where.split("/")[-1]] = value
    else:
        _edit(cfg, where, value)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_runtime_checkpoint(path)


def test_checkpoint_manifest_that_is_not_json_is_a_clear_error(tmp_path):
    from methods.checkpoint import CheckpointError, load_runtime_checkpoint
    path = _checkpoint(tmp_path)
    (path / "ptq_runtime.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_runtime_checkpoint(path)


# ---------------------------------------------------------------- model loading


def _save_tiny_checkpoint(path):
    from harness.inputs.models import tiny_llama, tiny_tokenizer
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_trust_remote_code_names_the_files_and_is_recorded(tmp_path, monkeypatch, caplog):
    import json

    from omegaconf import OmegaConf

    import harness.inputs.models as M
    ckpt = _save_tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "modeling_evil.py").write_text("import os\n")
    cfg_json = json.loads((ckpt / "config.json").read_text())
    cfg_json["auto_map"] = {"AutoModelForCausalLM": "other_code.EvilForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(cfg_json))
    monkeypatch.setattr(M, "_load_pretrained",
                        lambda ref, dtype, trust, rev: (M.tiny_llama(), M.tiny_tokenizer()))
    node = {"name": "x", "dtype": "float32", "device": "cpu", "trust_remote_code": True,
            "source": {"kind": "local", "path": str(ckpt)}}
    with caplog.at_level("WARNING"):
        lm = M.load_model(OmegaConf.create(node))
    assert "trust_remote_code" in caplog.text and "modeling_evil.py" in caplog.text
    assert lm.info["trust_remote_code"]["files"] == ["modeling_evil.py", "other_code.py"]
    caplog.clear()
    lm = M.load_model(OmegaConf.create({**node, "trust_remote_code": False}))
    assert "trust_remote_code" not in lm.info and "trust_remote_code" not in caplog.text


def test_trust_remote_code_reaches_the_record(compose_cfg, tmp_path):
    from harness.run.pipeline import run_one
    ckpt = _save_tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "modeling_x.py").write_text("")
    record = run_one(compose_cfg("model=local", f"model.source.path={ckpt}",
                                 "model.dtype=float32", "model.device=cpu",
                                 "model.trust_remote_code=true", "method=fp16",
                                 "eval=ppl-quick", "eval.max_windows=1", "eval.seqlen=64",
                                 "eval.datasets=[ptb]"))
    assert record.status == "ok", record.error
    info = record.provenance["model_info"]["trust_remote_code"]
    assert info["enabled"] is True and info["files"] == ["modeling_x.py"]


def test_local_models_are_labelled_by_their_directory(compose_cfg, tmp_path):
    from harness.run.pipeline import run_one
    common = ["model=local", "model.dtype=float32", "model.device=cpu", "method=fp16",
              "eval=ppl-quick", "eval.max_windows=1", "eval.seqlen=64", "eval.datasets=[ptb]"]
    a = _save_tiny_checkpoint(tmp_path / "llama-a")
    b = _save_tiny_checkpoint(tmp_path / "my model b")
    ra = run_one(compose_cfg(*common, f"model.source.path={a}"))
    rb = run_one(compose_cfg(*common, f"model.source.path='{b}'"))
    rn = run_one(compose_cfg(*common, f"model.source.path={a}", "model.name=chosen"))
    assert (ra.status, rb.status, rn.status) == ("ok", "ok", "ok"), (ra.error, rb.error)
    assert (ra.model, rb.model, rn.model) == ("llama-a", "my-model-b", "chosen")
    assert ra.config["model"]["name"] == "llama-a"
    missing = run_one(compose_cfg(*common))      # a failed record naming the setting
    assert missing.status == "failed" and "needs model.source.path" in missing.error


def test_gguf_file_loads_directly_with_its_stem_as_label(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import harness.inputs.gguf as G
    import harness.inputs.models as M
    path = tmp_path / "Tiny-Model.Q4_0.gguf"
    path.write_bytes(b"GGUF stand-in")
    monkeypatch.setattr(G, "load_gguf", lambda p, dtype, trust: (M.tiny_llama().to(dtype),
                                                                   M.tiny_tokenizer()))
    node = {"name": None, "dtype": "float32", "device": "cpu",
            "source": {"kind": "gguf", "path": str(path)}}
    lm = M.load_model(OmegaConf.create(node), tmp_path / "cache")
    assert lm.spec.name == "Tiny-Model.Q4_0" and lm.info["gguf_file"] == str(path)
    with pytest.raises(M.ModelLoadError, match="does not exist"):
        M.load_model(OmegaConf.create({**node, "source": {"kind": "gguf",
                                                          "path": str(tmp_path / "no.gguf")}}))
