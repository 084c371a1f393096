"""Robustness: store under concurrent writers, parquet export, quantized-model cache,
per-job fault categories, secret scrubbing and path containment (tiny-llama, CPU)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re

import pytest
import torch

import harness.run.pipeline as pl
from harness.inputs.models import tiny_llama
from harness.results.store import ResultStore, RunRecord, new_run_id
from harness.run.cache import MANIFEST, WEIGHTS, QuantizedModelCache, fake_quant_layout
from harness.run.callbacks import LauncherPluginMissing, require_launcher_plugin
from harness.run.pipeline import run_one
from harness.util.security import (
    REDACTED,
    UnsafePathError,
    is_secret_key,
    safe_name,
    scrub_secrets,
    within_root,
)
from methods.arch import ModelSpec
from methods.catalog import build
from methods.rtn import RTNConfig
from tests.conftest import REPO, TINY_QUICK

RTN_STATIC = [*TINY_QUICK, "method=rtn", "bits=w4a8", "method.act_mode=static_tensor"]


# ---------------------------------------------------------------- store

def _write_many(root: str, writer: int, n: int) -> None:
    store = ResultStore(root)
    for i in range(n):
        h = f"w{writer:02d}i{i:04d}"
        store.write(RunRecord(run_id=new_run_id(h), config_hash=h, status="ok", model="m",
                              method="rtn", bits="w4a8", eval="ppl", config={"i": i},
                              metrics={"ppl": float(i)}))


def test_store_8_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), w, 200)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = ResultStore(tmp_path)
    recs = store.records()
    assert store.corrupt == [] and len(recs) == 1600
    assert len({r["config_hash"] for r in recs}) == 1600
    assert len({r["run_id"] for r in recs}) == 1600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_store_never_reads_or_writes_through_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.json").write_text(json.dumps({"run_id": "x", "config_hash": "h",
                                                "status": "ok"}))
    root = tmp_path / "runs"
    store = ResultStore(root)
    store.write(RunRecord(run_id=new_run_id("h"), config_hash="h", status="ok", model="m",
                          method="fp16", bits="w16a16", eval="ppl", config={}))
    (root / "evil.json").symlink_to(outside / "x.json")
    assert [r["run_id"] for r in store.records()] != ["x"] and len(store.records()) == 1
    bad = RunRecord(run_id="../escape", config_hash="h", status="ok", model="m", method="fp16",
                    bits="w16a16", eval="ppl", config={})
    with pytest.raises(ValueError, match="plain file name"):
        store.write(bad)
    target = RunRecord(run_id="evil", config_hash="h", status="ok", model="m", method="fp16",
                       bits="w16a16", eval="ppl", config={})
    with pytest.raises(FileExistsError):
        store.write(target)
    assert json.loads((outside / "x.json").read_text())["run_id"] == "x"


def test_export_parquet_roundtrip(tmp_path):
    store = ResultStore(tmp_path / "runs")
    for i, status in enumerate(["ok", "failed", "ok"]):
        store.write(RunRecord(run_id=new_run_id(f"h{i}"), config_hash=f"h{i}", status=status,
                              model="m", method="rtn", bits="w4a8", eval="ppl",
                              config={"nested": {"a": [1, 2]}}, error=None if status == "ok"
                              else "data: missing", metrics={"ppl_ptb": 5.0 + i}
                              if status == "ok" else {}, timings={"quantize": 1.5}))
    path = store.export_parquet(tmp_path / "out" / "results.parquet")
    df = ResultStore.from_parquet(path)
    ref = store.load()
    assert list(df["run_id"]) == list(ref["run_id"]) and len(df) == 3
    assert df["ppl_ptb"].dropna().tolist() == ref["ppl_ptb"].dropna().tolist()
    full = [json.loads(s) for s in df[ResultStore.RECORD_COLUMN]]
    assert {r["run_id"]: r for r in full} == {r["run_id"]: r for r in store.records()}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- quantized-model cache

def test_cache_restore_is_exact_and_rejects_corruption(tmp_path):
    calib = [torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(i))
             for i in range(4)]
    model = tiny_llama(outliers={"0.input_layernorm": 40.0})
    spec = ModelSpec.from_model(model, "tiny")
    method = build(RTNConfig(w_bits=4, a_bits=8, group_size=32))
    qmodel = method.quantize(model, spec, calib)
    cache = QuantizedModelCache(tmp_path)
    cache.save("k1", {"p": 1}, qmodel, spec, method.artifacts)
    manifest = cache.read_manifest("k1")
    assert set(manifest["fake_quant"]) == set(fake_quant_layout(qmodel, spec))

    fresh = tiny_llama(outliers={"0.input_layernorm": 40.0})
    hit = cache.restore("k1", manifest, fresh, spec)
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(hit.model(ids).logits, qmodel(ids).logits, rtol=0, atol=0)
    for (n, a), (m, b) in zip(sorted(hit.model.state_dict().items()),
                              sorted(qmodel.state_dict().items()), strict=True):
        assert n == m and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert hit.artifacts == json.loads(json.dumps(method.artifacts))

    # a second writer of the same key keeps the first entry
    assert cache.save("k1", {"p": 1}, qmodel, spec, {}) == tmp_path / "k1"
    assert cache.read_manifest("k1")["created_at"] == manifest["created_at"]

    weights = tmp_path / "k1" / WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(RuntimeError, match="sha256"):
        cache.read_manifest("k1")
    with pytest.raises(UnsafePathError):
        cache.entry_dir("../k1")


def test_cache_hit_skips_quantize_and_reproduces_job(compose_cfg):
    first = run_one(compose_cfg(*RTN_STATIC))
    assert first.status == "ok" and first.provenance["cache"] == "miss"
    again_cfg = compose_cfg(*RTN_STATIC, "force=true")
    again = run_one(again_cfg)
    assert again.provenance["cache"] == "hit" and again.provenance["cache_key"] == \
        first.provenance["cache_key"]
    assert "quantize" not in again.timings and "cache_load" in again.timings
    assert again.metrics == first.metrics            # identical outputs, bit for bit
    assert again.artifacts["activation_stats"] == first.artifacts["activation_stats"]
    assert again.provenance["calibration"] == first.provenance["calibration"]
    other_eval = run_one(compose_cfg(*RTN_STATIC, "eval.max_windows=3"))
    assert other_eval.provenance["cache"] == "hit" and other_eval.config_hash != first.config_hash

    entry = os.path.join(again_cfg.cache.dir, first.provenance["cache_key"])
    weights = os.path.join(entry, WEIGHTS)
    with open(weights, "r+b") as fh:                  # flip bytes in the middle
        fh.seek(os.path.getsize(weights) // 2)
        fh.write(b"\xde\xad\xbe\xef")
    rebuilt = run_one(compose_cfg(*RTN_STATIC, "force=true"))
    assert rebuilt.status == "ok" and rebuilt.provenance["cache"] == "rebuilt"
    assert rebuilt.metrics == first.metrics and "quantize" in rebuilt.timings
    os.remove(os.path.join(entry, MANIFEST))          # a partial entry (writer killed)
    assert run_one(compose_cfg(*RTN_STATIC, "force=true")).provenance["cache"] == "rebuilt"
    assert run_one(compose_cfg(*RTN_STATIC, "force=true")).provenance["cache"] == "hit"


def test_cache_off_from_cli_and_fp16_not_cached(compose_cfg):
    cfg = compose_cfg(*RTN_STATIC, "cache=off")
    rec = run_one(cfg)
    assert rec.status == "ok" and rec.provenance["cache"] == "off"
    assert not os.path.exists(cfg.cache.dir)
    assert run_one(compose_cfg(*TINY_QUICK, "method=fp16")).provenance["cache"] == "off"
    # cache settings are not part of a job's identity
    on = compose_cfg(*RTN_STATIC)
    assert pl.job_config_hash(on) == rec.config_hash


# ---------------------------------------------------------------- fault handling

def _poison(path: str):
    """load_model whose model has a NaN weight at `path` (inside block 0)."""
    real = pl.load_model

    def load(*a, **k):
        lm = real(*a, **k)
        with torch.no_grad():
            lm.model.get_submodule(path).weight[0, 0] = math.nan
        return lm
    return load


def test_oom_gives_failed_record(compose_cfg, monkeypatch):
    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr("methods.rtn.RTN.quantize", oom)
    rec = run_one(compose_cfg(*RTN_STATIC))
    assert rec.status == "failed" and rec.error.startswith("out of memory:")
    monkeypatch.setattr("methods.rtn.RTN.quantize", lambda *a, **k: (_ for _ in ()).throw(
        MemoryError()))
    rec = run_one(compose_cfg(*RTN_STATIC))
    assert rec.status == "failed" and rec.error.startswith("out of memory: MemoryError")


def test_non_finite_calibration_and_eval_fail_clearly(compose_cfg, monkeypatch):
    monkeypatch.setattr(pl, "load_model", _poison("model.layers.0.mlp.down_proj"))
    rec = run_one(compose_cfg(*RTN_STATIC))
    assert rec.status == "failed" and rec.error.startswith("non-finite:")
    assert "block 0" in rec.error
    rec = run_one(compose_cfg(*TINY_QUICK, "method=fp16"))   # no calibration: the eval sees it
    assert rec.status == "failed" and rec.error.startswith("non-finite:")
    assert "ppl_ptb" not in rec.metrics and "logits" in rec.provenance["eval_errors"]["ppl_ptb"]
    stored = ResultStore(compose_cfg().paths.runs_dir).find(rec.config_hash, status=None)
    assert not any(k.startswith("ppl_") for k in stored[-1]["metrics"])


def test_model_load_failures_are_categorized(compose_cfg, monkeypatch, tmp_path):
    rec = run_one(compose_cfg(*TINY_QUICK, "model=local", f"model.source.path={tmp_path}/nope",
                              "model.device=cpu", "model.name=local"))
    assert rec.status == "failed" and rec.error.startswith("model load:")
    assert "does not exist" in rec.error

    def broken(*a, **k):
        raise ValueError("Unrecognized configuration class for this kind of AutoModel")
    monkeypatch.setattr(pl, "load_model", broken)
    rec = run_one(compose_cfg(*TINY_QUICK, "method=fp16"))
    assert rec.status == "failed" and rec.error.startswith("model load:")
    assert "Unrecognized configuration" in rec.error


def test_missing_and_malformed_data_are_categorized(compose_cfg, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(empty))
    calib = ["calib=c4-32x512", "calib.n_samples=2", "calib.seqlen=64"]
    rec = run_one(compose_cfg(*RTN_STATIC, *calib))
    assert rec.status == "failed" and rec.error.startswith("data:")
    assert "c4-train.00000-of-01024" in rec.error

    bad = tmp_path / "bad"
    (bad / "c4").mkdir(parents=True)
    (bad / "c4" / "c4-train.00000-of-01024.first1041.jsonl").write_text('{"text": "ok"}\n{oops\n')
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(bad))
    rec = run_one(compose_cfg(*RTN_STATIC, *calib))
    assert rec.status == "failed" and rec.error.startswith("data:")
    assert "first1041.jsonl:2" in rec.error

    rec = run_one(compose_cfg(*TINY_QUICK, "method=fp16", "eval.datasets=[wikitext2]"))
    assert rec.status == "failed" and rec.error.startswith("data:") and "wiki.test.raw" in rec.error


# ---------------------------------------------------------------- security

def test_secrets_are_scrubbed_from_records(compose_cfg):
    cfg = compose_cfg(*TINY_QUICK, "method=fp16", "+tracking.api_key=sk-live-123",
                      "+model.hf_token=hf_abc", "+tracking.notes.dbPassword=hunter2")
    rec = run_one(cfg)
    assert rec.status == "ok", rec.error
    text = ResultStore(cfg.paths.runs_dir).paths()[0].read_text()
    for secret in ("sk-live-123", "hf_abc", "hunter2"):
        assert secret not in text
    assert rec.config["model"]["hf_token"] == REDACTED
    assert rec.config["tracking"]["api_key"] == REDACTED
    assert "environ" not in text and os.environ.get("PATH", "~") not in text


def test_secret_key_words_and_scrub():
    assert all(map(is_secret_key, ["api_key", "HF_TOKEN", "wandbApiKey", "db-password",
                                   "AWS_SECRET_ACCESS_KEY", "token"]))
    assert not any(map(is_secret_key, ["tokenizer", "max_tokens", "keep_fp", "monkey",
                                       "n_tokens", "keys_layout"]))
    assert scrub_secrets({"a": [{"token": "t"}], "token": None}) == {
        "a": [{"token": REDACTED}], "token": None}


def test_path_escape_is_rejected(compose_cfg, tmp_path):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=fp16", "model.name=../../evil"))
    assert rec.status == "failed" and rec.error.startswith("config:")
    assert "model.name" in rec.error
    for bad in ("..", "a/b", "/etc/passwd", ".hidden", ""):
        with pytest.raises(UnsafePathError):
            safe_name(bad, "x")
    assert safe_name("llama-2-7b", "x") == "llama-2-7b"
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        within_root(tmp_path / "root", tmp_path / "root" / "link" / "x", "entry")


def test_trust_remote_code_defaults_off_and_is_passed_through(monkeypatch, tmp_path):
    import yaml

    for path in (REPO / "conf" / "model").glob("*.yaml"):
        assert yaml.safe_load(path.read_text()).get("trust_remote_code", False) is False, path
    from omegaconf import OmegaConf

    import harness.inputs.models as models
    seen = []
    monkeypatch.setattr(models, "_load_pretrained",
                        lambda ref, dtype, trust, rev: seen.append(trust) or (_ for _ in ()).throw(
                            OSError("stop")))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")   # looks like a checkpoint
    for trust in (None, True):
        node = {"name": "local", "dtype": "float32", "device": "cpu",
                "source": {"kind": "local", "path": str(tmp_path / "ckpt")}}
        if trust is not None:
            node["trust_remote_code"] = trust
        with pytest.raises(models.ModelLoadError):
            models.load_model(OmegaConf.create(node))
    assert seen == [False, True]


def test_no_pickle_loading_in_repo():
    unsafe = re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)")
    hits = [str(p) for d in ("harness", "methods", "kernels") for p in (REPO / d).rglob("*.py")
            if unsafe.search(p.read_text()) or "pickle.load" in p.read_text()]
    assert hits == []


def test_missing_launcher_plugin_says_what_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "ray" in name else real(name, *a))
    with pytest.raises(LauncherPluginMissing, match="pip install hydra-ray-launcher"):
        require_launcher_plugin(["-m", "launcher=ray", "method=rtn"])
    require_launcher_plugin(["launcher=joblib"])   # installed: no error


def test_staged_dir_publishes_once_keeps_an_existing_final_and_cleans_up(tmp_path):
    from harness.util.fsutil import StagedDir

    final = tmp_path / "entry"
    with StagedDir(final) as a:
        (a.path / "x").write_text("first")
    with StagedDir(final) as b:                       # a concurrent writer lost the race
        (b.path / "x").write_text("second")
    with pytest.raises(RuntimeError), StagedDir(tmp_path / "other") as c:
        (c.path / "x").write_text("half")
        raise RuntimeError("writer died")
    assert a.published and not b.published and not c.published
    assert (final / "x").read_text() == "first" and not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]   # no temp dirs left
