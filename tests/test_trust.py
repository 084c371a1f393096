"""Trust in the numbers (issue 15): one regression test per failure class. Each fails on
the code before its fix: labels from the effective config, rows keyed by every setting,
data identity, partial and interrupted jobs, context length, validated settings, report
paths, runs dir, concurrent identical jobs, malformed records."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_QUICK

import harness.evals.ppl as ppl_mod
from harness.results import report_cli
from harness.results.paper_tables import perplexity_table
from harness.results.records import records_frame
from harness.results.store import CorruptRecord, ResultStore, RunRecord, validate_record
from harness.run import pipeline as pl
from harness.run.pipeline import RunsDirError, run_one

WIKI = "wikitext-2-raw/wiki.test.raw"


def _text(n_words: int = 3000, seed: int = 0) -> str:
    import random
    rng = random.Random(seed)
    words = ["the", "model", "a", "token", "of", "quantized", "weights", "is", "and", "to"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(12))
                     for _ in range(n_words // 12)) + "\n"


def _data_dir(root: Path, text: str | None) -> Path:
    root.mkdir(parents=True)
    if text is not None:
        (root / WIKI).parent.mkdir(parents=True)
        (root / WIKI).write_text(text, encoding="utf-8")
    return root


# ---------------------------------------------------------------- 1. labels


def test_labels_come_from_the_effective_config(compose_cfg):
    def labels(*o):
        return pl._labels(pl.resolved(compose_cfg(*TINY_QUICK, *o)))
    assert labels("method=rtn", "bits=w4a8", "bits.w_bits=8")["bits"] == "w8a8"
    assert labels("method=rtn", "bits=w4a8", "method.a_bits=16")["bits"] == "w4a16"
    assert labels("method=rtn", "bits=w4a8kv4")["bits"] == "w4a8kv4"
    assert labels("method=rtn", "method._target_=methods.gptq.GPTQConfig")["method"] == "gptq"
    assert labels("method=awq_noclip")["method"] == "awq_noclip"     # a preset of its class
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a16", "bits.w_bits=8"))
    assert rec.status == "ok", rec.error
    assert rec.bits == "w8a16" and rec.config["bits"]["name"] == "w4a16"


# ---------------------------------------------------------------- 2. report rows


def _ppl_record(i: int, method: str, seqlen: int, value: float, eval_name: str = "ppl",
                status: str = "ok", errors: dict | None = None) -> RunRecord:
    cfg = {"model": {"name": "m"}, "method": {"name": method, "group_size": 64},
           "bits": {"name": "w4a8" if method != "fp16" else "w16a16"},
           "eval": {"name": eval_name, "evaluators": ["ppl"], "datasets": ["wikitext2", "c4"],
                    "seqlen": seqlen, "max_windows": 4}, "seed": 0}
    prov = {"eval_errors": errors} if errors else {}
    metrics = {"ppl_wikitext2": value} if value else {}
    return RunRecord(run_id=f"r{i:02d}-x", config_hash=f"h{i:015d}", status=status, model="m",
                     method=method, bits=cfg["bits"]["name"], eval=eval_name, config=cfg,
                     metrics=metrics, provenance=prov, error=None if status == "ok" else "x",
                     started_at=f"2024-05-01T10:00:{i:02d}+00:00",
                     finished_at=f"2024-05-01T10:00:{i:02d}+00:00")


def _table(tmp_path: Path, records: list[RunRecord]):
    store = ResultStore(tmp_path / "runs")
    for r in records:
        store.write(r)
    return perplexity_table(records_frame(store))


def test_same_label_different_settings_are_never_merged(tmp_path):
    t = _table(tmp_path, [_ppl_record(1, "fp16", 2048, 10.0),
                          _ppl_record(2, "rtn", 2048, 12.0),
                          _ppl_record(3, "rtn", 256, 30.0)])      # newest, other seqlen
    assert "Setting" in t.columns
    rows = {(r[1].text, r[3].text): r for r in t.rows}
    assert rows[("rtn", "eval.seqlen=2048")][4].text == "12.00"
    assert rows[("rtn", "eval.seqlen=256")][4].text == "30.00"
    # Δ only against an fp16 row at the same settings: none at seqlen 256
    assert rows[("rtn", "eval.seqlen=2048")][5].text == "+2.00"
    assert rows[("rtn", "eval.seqlen=256")][5].text == "–"


def test_replaced_record_at_same_settings_is_listed(tmp_path):
    t = _table(tmp_path, [_ppl_record(1, "rtn", 2048, 12.0, eval_name="ppl"),
                          _ppl_record(2, "rtn", 2048, 12.5, eval_name="ppl-again")])
    assert len(t.rows) == 1 and "Setting" not in t.columns
    assert any("r01-x → r02-x" in f for f in t.footnotes)


# ---------------------------------------------------------------- 3. data identity


def test_data_content_is_part_of_the_identity(compose_cfg, tmp_path):
    a = _data_dir(tmp_path / "a", _text())
    b = tmp_path / "b"
    shutil.copytree(a, b)
    base = [*TINY_QUICK, "method=fp16", "eval.datasets=[wikitext2]"]
    first = run_one(compose_cfg(*base, f"paths.data_dir={a}"))
    assert first.status == "ok", first.error
    assert first.provenance["data_fingerprint"][WIKI]
    same = run_one(compose_cfg(*base, f"paths.data_dir={b}"))   # same content, other path
    assert same.provenance.get("resumed") and same.run_id == first.run_id
    (b / WIKI).write_text(_text(seed=1), encoding="utf-8")        # changed file
    changed = run_one(compose_cfg(*base, f"paths.data_dir={b}"))
    assert not changed.provenance.get("resumed") and changed.config_hash != first.config_hash
    assert changed.metrics["ppl_wikitext2"] != first.metrics["ppl_wikitext2"]


def test_every_data_file_a_reader_opens_is_fingerprinted():
    """The source tables the fingerprint uses name every file the readers open."""
    from harness.evals.tasks import ALL_TASKS, TASK_SOURCES
    from harness.inputs import data
    from harness.run.data_identity import job_data_sources, undeclared_reads
    for task in ALL_TASKS:
        assert TASK_SOURCES[task], task
    for name in ("wikitext2", "c4"):
        data.files_read(reset=True)
        with pytest.raises(data.DataMissingError):
            data.eval_text(name, None)
        cfg = {"eval": {"evaluators": ["ppl"], "datasets": [name]}}
        assert not undeclared_reads(data.files_read(), job_data_sources(cfg))
    for name in ("c4", "wikitext2"):
        data.files_read(reset=True)
        with pytest.raises(data.DataMissingError):
            data.calib_documents(name, None)
        cfg = {"eval": {}, "method": {"w_bits": 4, "a_bits": 16}, "calib": {"dataset": name}}
        assert not undeclared_reads(data.files_read(), job_data_sources(cfg))


# ---------------------------------------------------------------- 4. partial results


def test_failed_dataset_makes_a_partial_record_that_resume_reruns(compose_cfg, tmp_path):
    empty = _data_dir(tmp_path / "nodata", None)
    cfg = compose_cfg(*TINY_QUICK, "method=fp16", "eval.datasets=[ptb,wikitext2]",
                      f"paths.data_dir={empty}")
    rec = run_one(cfg)
    assert rec.status == "partial" and "ppl_ptb" in rec.metrics
    assert "ppl_wikitext2" not in rec.metrics and "wiki.test.raw" in rec.error
    again = run_one(cfg)
    assert not again.provenance.get("resumed") and again.run_id != rec.run_id
    t = perplexity_table(records_frame(ResultStore(cfg.paths.runs_dir)))
    cells = [c.text for c in t.rows[0]]
    assert any(c.startswith("missing[") for c in cells)
    assert any("missing: DataMissingError: WikiText-2" in f for f in t.footnotes)


# ---------------------------------------------------------------- 5. interrupts


@pytest.mark.parametrize("how", ["sigint", "sigterm"])
def test_interrupted_job_is_recorded_interrupted_and_rerun(compose_cfg, monkeypatch, how):
    def interrupted(ctx, cfg):
        if how == "sigint":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")
    cfg = compose_cfg(*TINY_QUICK, "method=fp16")
    monkeypatch.setattr(ppl_mod, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg)
    [rec] = ResultStore(cfg.paths.runs_dir).records()
    assert rec["status"] == "interrupted" and rec["metrics"].get("ppl_ptb") is None
    monkeypatch.undo()
    again = run_one(cfg)
    assert again.status == "ok" and not again.provenance.get("resumed")


# ---------------------------------------------------------------- 6. context length


@pytest.mark.parametrize("overrides,key", [
    (["method=fp16", "eval.seqlen=4096"], "eval.seqlen=4096"),
    (["method=rtn", "bits=w8a8", "method.act_mode=static_tensor", "calib.seqlen=8192"],
     "calib.seqlen=8192"),
])
def test_lengths_beyond_the_model_context_are_refused(compose_cfg, overrides, key):
    rec = run_one(compose_cfg(*TINY_QUICK, *overrides))
    assert rec.status == "skipped" and key in rec.error and "2048" in rec.error
    assert not rec.metrics


# ---------------------------------------------------------------- unclear errors


@pytest.mark.parametrize("overrides,status,says", [
    (["method=rtn", "bits=w4a16", "bits.group_size=abc"], "skipped", "group_size='abc'"),
    (["method=rtn", "bits=w4a16", "bits.group_size=0"], "skipped", "group_size=0"),
    (["calib.n_samples=0"], "failed", "calib.n_samples=0"),
    (["eval.max_windows=0"], "failed", "eval.max_windows=0"),
    (["eval.max_windows=-1"], "failed", "eval.max_windows=-1"),
    (["eval.datasets=[wikitext3]"], "failed", "eval.datasets[0]='wikitext3'"),
    (["seed=abc"], "failed", "seed='abc'"),
    (["tracking.kind=bogus"], "failed", "tracking.kind='bogus'"),
    (["model=local"], "failed", "needs model.source.path"),
    (["paths.data_dir=/nope"], "failed", "paths.data_dir='/nope'"),
    # switches given as text were truthy (rerun_failed=no reran failed jobs)
    (["rerun_failed=no"], "failed", "rerun_failed='no' is not valid: allowed true or false"),
    (["method=rtn", "bits=w4a8", "save_checkpoint=sure"], "failed", "save_checkpoint='sure'"),
    (["model.trust_remote_code=nope"], "failed", "model.trust_remote_code='nope'"),
    # an unknown export format failed only after quantizing, in an `ok` record
    (["method=rtn", "bits=w4a8", "export=onnx"], "failed", "export='onnx'"),
    (["method=rtn", "bits=w4a8", "method.keep_w8=5"], "skipped", "method.keep_w8=5"),
    # method fields of the wrong type: a bare TypeError without the key, or truthy text
    (["method=gptq", "bits=w4a16", "method.damp=abc"], "skipped", "method.damp='abc'"),
    (["method=gptq", "bits=w4a16", "method.act_order=maybe"], "skipped",
     "method.act_order='maybe' (GPTQConfig) must be true or false"),
    (["method=rtn", "bits=w4a8", "method.act_mode=dynamic"], "skipped", "method.act_mode="),
    # an unwritable artifacts dir failed after quantizing, without the key
    (["save_checkpoint=true", "paths.artifacts_dir=/proc/ptqbench-nope"], "failed",
     "paths.artifacts_dir='/proc/ptqbench-nope' cannot take the run's artifacts"),
    # a misspelt key added with `+` was accepted and silently ignored
    (["+eval.max_window=1"], "failed", "did you mean max_windows?"),
    (["+calib.nsamples=2"], "failed", "calib.nsamples is not a setting"),
    (["+cache.verfy=false"], "failed", "did you mean verify?"),
    (["+placement.moed=disk"], "failed", "did you mean mode?"),
    (["+rerun_faild=false"], "failed", "did you mean rerun_failed?"),
])
def test_bad_settings_give_a_record_naming_key_and_value(compose_cfg, overrides, status, says):
    cfg = compose_cfg(*TINY_QUICK, *overrides)
    rec = run_one(cfg)
    assert rec.status == status and says in rec.error, rec.error
    assert not rec.metrics and "load" not in rec.timings       # nothing ran
    assert [r["run_id"] for r in ResultStore(cfg.paths.runs_dir).records()] == [rec.run_id]


@pytest.mark.parametrize("pattern", ["notalist", "[mlp.dwn_proj]"])
def test_keep_patterns_that_match_no_linear_are_refused(compose_cfg, pattern):
    # a bare string was split into its characters; a typo kept nothing, silently
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a8",
                              f"method.keep_fp={pattern}"))
    assert rec.status == "skipped" and "method.keep_fp" in rec.error, rec.error
    assert pattern.strip("[]") in rec.error and "model.layers.1.mlp.down_proj" in rec.error
    ok = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a8",
                             "method.keep_fp=mlp.down_proj"))
    assert ok.status == "ok" and ok.config["method"]["keep_fp"] == "mlp.down_proj"


def test_bad_model_source_values_are_named(compose_cfg, tmp_path):
    # were `IndexError: index 0 is out of range` and a tokenizer-backend error
    (tmp_path / "not_a_model").mkdir()
    for overrides, says in ((["model.source.kwargs.num_layers=0"],
                             "model.source.kwargs.num_layers=0"),
                            (["model=local", f"model.source.path={tmp_path}/not_a_model"],
                             "holds no config.json")):
        rec = run_one(compose_cfg(*TINY_QUICK[1:], *overrides) if "model=local" in overrides
                      else compose_cfg(*TINY_QUICK, *overrides))
        assert rec.status == "failed" and says in rec.error, rec.error


def test_unwritable_runs_dir_fails_before_the_work(compose_cfg, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(pl, "load_model", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(RunsDirError, match="paths.runs_dir"):
        run_one(compose_cfg(*TINY_QUICK, "method=fp16", f"paths.runs_dir={blocker}/runs"))


def test_identical_job_running_elsewhere_is_waited_for_then_skipped(compose_cfg):
    cfg = compose_cfg(*TINY_QUICK, "method=fp16")
    h = pl.job_config_hash(cfg)
    store = pl.writable_store(cfg.paths.runs_dir)
    held, done = threading.Event(), RunRecord(run_id="other-process-run", config_hash=h,
                                               status="ok", model="tiny-llama", method="fp16",
                                               bits="w16a16", eval="ppl-quick", config={})

    def other_process():
        with pl.config_lock(store, h):
            held.set()
            time.sleep(1.0)
            store.write(done)
    t = threading.Thread(target=other_process)
    t.start()
    held.wait()
    rec = run_one(cfg)
    t.join()
    assert rec.run_id == "other-process-run" and rec.provenance.get("resumed")


# ---------------------------------------------------------------- malformed records, report paths


def test_record_with_wrong_field_types_is_named_and_skipped(tmp_path, capsys):
    runs = tmp_path / "runs"
    ResultStore(runs).write(_ppl_record(1, "fp16", 2048, 10.0))
    bad = json.loads((next(runs.glob("*.json"))).read_text())
    bad.update(run_id="bad-types", metrics="not a dict", config_hash=7)
    (runs / "bad-types.json").write_text(json.dumps(bad))
    with pytest.raises(CorruptRecord, match="config_hash"):
        validate_record(bad, "x.json")
    assert report_cli.main(["--runs", str(runs), "--out-root", str(tmp_path / "out"),
                            "--name", "r", "--no-plots"]) == 0
    text = (tmp_path / "out" / "r" / "report.md").read_text()
    assert "bad-types.json" in text and "config_hash" in text


def test_report_command_line_paths_are_checked_before_anything_is_written(tmp_path, capsys):
    # a wrong --references / --bench silently dropped a table, an unwritable --out-root was
    # a traceback, --export to a directory failed after the work
    runs = tmp_path / "runs"
    ResultStore(runs).write(_ppl_record(1, "fp16", 2048, 10.0))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    base = ["--runs", str(runs), "--no-plots", "--out-root", str(tmp_path / "out")]
    for bad, says in ((["--runs", str(tmp_path / "nope")], "--runs"),
                      (["--references", str(tmp_path / "nope")], "--references"),
                      (["--bench", str(tmp_path / "nope")], "--bench"),
                      (["--export", str(runs)], "--export"),
                      (["--export", str(tmp_path / "x.json")], "--export"),
                      (["--out-root", str(blocker / "sub")], "--out-root")):
        assert report_cli.main([*base, *bad]) == 2, bad
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.json").exists()
    assert report_cli.main(base) == 0


def test_report_paths_from_record_fields_stay_inside_the_output_root(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    rec = _ppl_record(1, "fptq", 2048, 10.0)
    rec.model, rec.bits, rec.method = "../../../escaped", "w4/../../x", "fptq/../../y"
    rec.artifacts = {"fptq_policy": [{"block": 0, "linear": "mlp.down_proj", "role": "mlp",
                                      "v": 40.0, "bucket": 1, "strategy": "lae"}]}
    ResultStore(runs).write(rec)
    assert report_cli.main(["--runs", str(runs), "--out-root", str(out)]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and runs not in p.parents]
    assert written and all(out in p.parents for p in written), written
    assert report_cli.main(["--runs", str(runs), "--out-root", str(out), "--name", "../x"]) == 2


# ---------------------------------------------------------------- property: random record files

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:       # pragma: no cover - the dev extra installs hypothesis
    given = None

if given is not None:
    NASTY = st.sampled_from(["../../x", "a/b", "", ".", "..", "/abs", "fp16", "w4a8", "rtn",
                             "fptq (policy=all)", "x\\y", "ok", "..\\..\\w", "é/ü", "\x00"])
    TEXT = st.one_of(NASTY, st.text(max_size=12))
    JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), TEXT,
                                  st.floats(allow_nan=True, allow_infinity=True)),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3),
                        max_leaves=8)
    FIELD = st.one_of(TEXT, JSON)
    RECORD = st.fixed_dictionaries(
        {"run_id": st.one_of(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), FIELD),
         "config_hash": st.one_of(st.sampled_from(["h1", "h2"]), FIELD),
         "status": st.one_of(st.sampled_from(["ok", "failed", "skipped", "partial",
                                              "interrupted"]), FIELD),
         "model": FIELD, "method": FIELD, "bits": FIELD, "eval": FIELD},
        optional={"config": st.one_of(st.dictionaries(st.sampled_from(
                      ["model", "method", "eval", "calib", "bits", "seed"]), JSON), FIELD),
                  "metrics": st.one_of(st.dictionaries(st.sampled_from(
                      ["ppl_wikitext2", "ppl_c4", "acc_piqa", "mmlu_avg", "time_quantize",
                       "decode_tok_s_b1"]), st.one_of(st.floats(), TEXT, JSON)), FIELD),
                  "provenance": st.one_of(st.dictionaries(st.sampled_from(
                      ["calibration", "data_fingerprint", "eval_errors"]), JSON), FIELD),
                  "artifacts": st.one_of(st.dictionaries(st.just("fptq_policy"), JSON), FIELD),
                  "timings": FIELD, "memory": FIELD, "error": FIELD, "finished_at": FIELD})
    FILE = st.one_of(RECORD.map(lambda r: json.dumps(r)), st.binary(max_size=40).map(
        lambda b: b.decode("latin-1")), JSON.map(json.dumps))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(files=st.lists(FILE, min_size=1, max_size=5))
    def test_report_never_crashes_nor_writes_outside_on_random_records(files):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            runs, out = root / "runs", root / "out"
            runs.mkdir()
            for i, text in enumerate(files):
                (runs / f"f{i}.json").write_text(text, encoding="utf-8", errors="replace")
            for args in ([], ["--print"], ["--name", "r"]):
                rc = report_cli.main(["--runs", str(runs), "--out-root", str(out),
                                      "--no-plots", "--references", str(root / "none"), *args])
                assert rc in (0, 1, 2)
            written = [p for p in root.rglob("*") if p.is_file() and runs not in p.parents]
            assert all(out in p.parents for p in written), written


# ---------------------------------------------------------------- concurrent identical sweeps


def _hydra_dirs(tmp_path):
    """(hydra.run.dir, hydra.sweep.dir) of conf/run.yaml as the CLI resolves them."""
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    from harness.run.config_defaults import register_invocation_resolver, register_method_defaults
    register_method_defaults()
    register_invocation_resolver()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[f"paths.results_dir={tmp_path}"],
                      return_hydra_config=True)
        return str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)


def test_identical_commands_in_the_same_second_get_their_own_hydra_folders(tmp_path,
                                                                          monkeypatch):
    import datetime as dt

    import hydra.core.utils as hydra_utils

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(hydra_utils, "datetime", Frozen)
    first, second = _hydra_dirs(tmp_path), _hydra_dirs(tmp_path)
    for a, b in zip(first, second, strict=True):
        assert "2026-01-02_03-04-05" in a and a != b
        assert Path(a).parent == Path(b).parent


def test_two_identical_sweeps_at_once_keep_their_hydra_outputs_apart(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    res = tmp_path / "res"
    # eval.max_windows=0 fails in settings validation: each job writes a record, loads nothing
    cmd = [sys.executable, "-m", "harness.run.cli", "-m", *TINY_QUICK, "method=fp16",
           "bits=w16a16,w8a16", "eval.max_windows=0", f"paths.results_dir={res}",
           f"paths.cache_dir={res}/cache", "+hf_token=hf_SECRETVALUE1"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    sweeps = sorted((res / "hydra" / "multirun").iterdir())
    assert len(sweeps) == 2, sweeps
    for sweep in sweeps:
        assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == ["0", "1"]
        summary = json.loads((sweep / "sweep_summary.json").read_text())
        assert summary["counts"]["failed"] == 2
        for job in ("0", "1"):
            log = (sweep / job / "run.log").read_text()
            assert log.count("] - record ") == 1, log      # one job's log, not two
            overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
            assert "hf_SECRETVALUE1" not in overrides and "redacted" in overrides
    labels = {json.loads(p.read_text())["sweep"] for p in (res / "runs").glob("*.json")}
    assert labels == {s.name for s in sweeps}
