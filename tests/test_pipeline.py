"""End to end through the real Hydra configs on tiny-llama: records, skip, resume, errors."""

import json
import subprocess
import sys

import pytest

from harness.results.store import ResultStore
from harness.run.pipeline import run_one
from tests.conftest import REPO, TINY_QUICK


def test_rtn_job_writes_ok_record(compose_cfg):
    cfg = compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a8", "method.act_mode=static_tensor")
    rec = run_one(cfg)
    assert rec.status == "ok", rec.error
    assert rec.metrics["ppl_ptb"] > 1
    assert rec.bits == "w4a8" and rec.method == "rtn" and rec.model == "tiny-llama"
    assert rec.provenance["model_repr"] == {"FakeQuantLinear": 14}
    assert {"load", "quantize", "eval_ppl"} <= set(rec.timings)
    assert rec.provenance["versions"]["torch"]
    df = ResultStore(cfg.paths.runs_dir).load()
    assert len(df) == 1 and df.loc[0, "status"] == "ok" and df.loc[0, "ppl_ptb"] > 1


def test_unsupported_combination_is_skipped(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=fp16", "bits=w4a8"))
    assert rec.status == "skipped" and "does not support w4a8" in rec.error


def test_group_size_not_dividing_is_skipped(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a16", "bits.group_size=48"))
    assert rec.status == "skipped" and "does not divide" in rec.error


def test_invalid_bits_is_skipped_with_reason(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a16", "bits.w_bits=5"))
    assert rec.status == "skipped" and "w_bits=5" in rec.error


def test_rerun_skips_ok_then_force(compose_cfg):
    cfg = compose_cfg(*TINY_QUICK, "method=fp16", "bits=w16a16")
    first = run_one(cfg)
    again = run_one(cfg)
    assert again.run_id == first.run_id
    store = ResultStore(cfg.paths.runs_dir)
    assert len(store.paths()) == 1
    cfg.force = True
    forced = run_one(cfg)
    assert forced.run_id != first.run_id and len(store.paths()) == 2


def test_failure_writes_failed_record_and_rerun_retries(compose_cfg, monkeypatch):
    cfg = compose_cfg(*TINY_QUICK, "method=fp16", "bits=w16a16")
    import harness.run.pipeline as pl

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(pl, "load_model", boom)
    rec = run_one(cfg)
    assert rec.status == "failed" and "disk on fire" in rec.error
    monkeypatch.undo()
    rec2 = run_one(cfg)
    assert rec2.status == "ok" and rec2.run_id != rec.run_id


def test_missing_data_fails_with_file_name(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    rec = run_one(compose_cfg(*TINY_QUICK, "method=fp16", "eval.datasets=[wikitext2]"))
    assert rec.status == "failed"
    assert "wiki.test.raw" in rec.provenance["eval_errors"]["ppl_wikitext2"]


def test_static_activations_need_calibration_and_run_blockwise(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w8a8", "method.act_mode=static_tensor"))
    assert rec.status == "ok"
    stats = rec.artifacts["activation_stats"]
    assert len(stats) == 14 and all(r["max_abs"] > 0 for r in stats)
    assert rec.provenance["calibration"]["strategy"] == "random_tokens"


def test_multirun_cli_sweeps_and_unknown_option_lists_choices(tmp_path):
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "harness.run.cli", "-m", *TINY_QUICK, "method=fp16,rtn",
           "bits=w16a16,w4a8", f"paths.results_dir={res}", f"paths.cache_dir={res}/cache"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in (res / "runs").glob("*.json")]
    got = sorted((r["method"], r["bits"], r["status"]) for r in recs)
    assert got == [("fp16", "w16a16", "ok"), ("fp16", "w4a8", "skipped"),
                   ("rtn", "w16a16", "skipped"), ("rtn", "w4a8", "ok")]
    assert len({r["sweep"] for r in recs}) == 1 and recs[0]["sweep"]

    bad = subprocess.run([sys.executable, "-m", "harness.run.cli", "method=nosuch"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "Could not find 'method/nosuch'" in bad.stderr and "rtn" in bad.stderr


@pytest.mark.parametrize("group", ["model", "method", "bits", "calib", "eval", "launcher",
                                   "paths", "tracking", "experiment"])
def test_config_groups_exist(group):
    assert (REPO / "conf" / group).is_dir()
