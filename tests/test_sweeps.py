"""Sweeps through the real CLI: kill -9 mid-sweep then resume; joblib and submitit_local
launchers; the end-of-sweep summary (harness/run/callbacks.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from harness.run.callbacks import SUMMARY_FILE
from tests.conftest import REPO, TINY_QUICK


def _cmd(res: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "harness.run.cli", "-m", *TINY_QUICK, "eval.max_windows=1",
            f"paths.results_dir={res}", f"paths.cache_dir={res}/cache", *overrides]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _records(res: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((res / "runs").glob("*.json"))]


def _summaries(res: Path) -> list[dict]:
    paths = sorted((res / "hydra" / "multirun").glob(f"*/{SUMMARY_FILE}"))
    return [json.loads(p.read_text()) for p in paths]


def test_sweep_killed_mid_job_resumes_without_loss_or_duplicates(tmp_path):
    res = tmp_path / "res"
    cmd = _cmd(res, "method=rtn", "bits=w8a16,w4a16,w3a16")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list((res / "hydra" / "multirun").glob("*/1")):   # the 2nd job has started
            assert proc.poll() is None, "sweep ended before its 2nd job started"
            assert time.monotonic() < deadline, "2nd job never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _records(res)
    assert [r["bits"] for r in before] in ([], ["w8a16"])   # a killed job leaves no record
    assert all(r["status"] == "ok" for r in before)
    # no half-written record (temp files start with "."); the per-config lock directory
    # .locks may stay: its flock died with the process
    leftovers = [p for p in (res / "runs").glob(".*") if p.name != ".locks"]
    assert not leftovers if (res / "runs").exists() else True

    out = _run(cmd)
    after = _records(res)
    ok = Counter(r["config_hash"] for r in after if r["status"] == "ok")
    assert sorted(r["bits"] for r in after) == ["w3a16", "w4a16", "w8a16"]
    assert len(ok) == 3 and max(ok.values()) == 1            # no duplicate ok records
    counts = _summaries(res)[-1]["counts"]
    assert counts["resumed"] == len(before) and counts["ok"] == 3 - len(before)
    assert counts["failed"] == counts["missing"] == 0
    log = out.stdout + out.stderr
    assert log.count("resume: skip") == len(before) and "sweep summary (3 jobs)" in log
    assert "sweep: 3 jobs" in log and "sweep progress: job 3 of 3 done (rtn w3a16: ok)" in log
    table = log[log.index("sweep results:"):]
    assert "| job | model | method | bits | eval | outcome | result |" in table
    assert all(f"| rtn | {b} |" in table for b in ("w8a16", "w4a16", "w3a16"))


def test_sweep_size_counts_swept_params_and_command_line():
    from omegaconf import OmegaConf

    from harness.run.callbacks import jobs_table, sweep_size

    cfg = OmegaConf.create({"hydra": {
        "sweeper": {"params": {"method": "fp16,rtn", "bits": "w16a16,w8a8,w4a8"}},
        "overrides": {"task": ["bits=w4a8,w8a8", "model=tiny", "eval.max_windows=1"]}}})
    assert sweep_size(cfg) == 4          # method x the command line's bits
    md = jobs_table([{"job": 0, "model": "m", "method": "rtn", "bits": "w4a8", "eval": "ppl",
                      "outcome": "ok", "headline": {"WikiText-2": "25.30"}},
                     {"job": 1, "model": "m", "method": "fp16", "bits": "w4a8", "eval": "ppl",
                      "outcome": "skipped", "error": "fp16 | quantizes nothing"}])
    assert "| 0 | m | rtn | w4a8 | ppl | ok | WikiText-2 25.30 |" in md
    assert "| 1 | m | fp16 | w4a8 | ppl | skipped | fp16 / quantizes nothing |" in md


def test_joblib_sweep_of_4_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    res = tmp_path / "res"
    _run(_cmd(res, "launcher=joblib", "hydra.launcher.n_jobs=2", "method=fp16,rtn",
              "bits=w16a16,w8a16"))
    got = sorted((r["method"], r["bits"], r["status"]) for r in _records(res))
    assert got == [("fp16", "w16a16", "ok"), ("fp16", "w8a16", "skipped"),
                   ("rtn", "w16a16", "skipped"), ("rtn", "w8a16", "ok")]
    assert len({r["provenance"]["host"] for r in _records(res)}) == 1
    summary = _summaries(res)[-1]
    assert summary["jobs"] == 4 and summary["counts"]["ok"] == 2
    assert summary["counts"]["skipped"] == 2


def test_submitit_local_sweep_of_2_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    res = tmp_path / "res"
    _run(_cmd(res, "launcher=submitit_local", "method=rtn", "bits=w8a16,w4a16"))
    recs = _records(res)
    assert sorted((r["bits"], r["status"]) for r in recs) == [("w4a16", "ok"), ("w8a16", "ok")]
    assert list((res / "hydra" / "multirun").glob("*/.submitit"))
    assert _summaries(res)[-1]["counts"]["ok"] == 2


def test_keys_of_swept_groups_are_lifted_so_the_primary_compose_accepts_them():
    from harness.run.overrides import lift_swept_group_keys

    argv = ["-m", "model=tiny-llama", "method=fp16,fptq", "bits=w16a16,w4a8",
            "eval=commonsense,mmlu", "eval.limit=5", "eval.limt=5", "method.v0=10",
            "method.alpha=0.3", "paths.results_dir=x"]
    out = lift_swept_group_keys(argv)
    assert out == ["-m", "model=tiny-llama", "method=fp16,fptq", "bits=w16a16,w4a8",
                   "eval=commonsense,mmlu", "++eval.limit=5",   # defined by the swept evals
                   "eval.limt=5",          # a typo: Hydra still reports it
                   "++method.v0=10",       # fptq has v0 (the default fp16 does not)
                   "method.alpha=0.3",     # neither fp16 nor fptq has alpha
                   "paths.results_dir=x"]  # paths is not swept
    single = ["method=fptq", "eval=commonsense", "eval.limit=5"]
    assert lift_swept_group_keys(single) == single            # not a multirun: untouched


def test_setting_of_one_swept_method_skips_the_others_with_the_reason(tmp_path):
    """`method=rtn,gptq method.true_sequential=false`: rtn has no such setting, so its job is
    recorded as skipped (naming the setting) and gptq runs."""
    res = tmp_path / "res"
    _run(_cmd(res, "method=rtn,gptq", "bits=w4a16", "method.true_sequential=false",
              "calib.n_samples=2", "calib.seqlen=32"))
    recs = {r["method"]: r for r in _records(res)}
    assert recs["gptq"]["status"] == "ok"
    assert recs["rtn"]["status"] == "skipped"
    assert "has no setting true_sequential" in recs["rtn"]["error"]
