import json
import math

from harness.results.store import ResultStore, RunRecord, config_hash, new_run_id


def _rec(status="ok", h="abc", **metrics):
    return RunRecord(run_id=new_run_id(h), config_hash=h, status=status, model="m",
                     method="rtn", bits="w4a8", eval="ppl", config={"a": 1}, metrics=metrics)


def test_write_is_atomic_and_never_overwrites(tmp_path):
    store = ResultStore(tmp_path)
    rec = _rec(ppl_ptb=10.0)
    path = store.write(rec)
    assert json.loads(path.read_text())["metrics"] == {"ppl_ptb": 10.0}
    assert not list(tmp_path.glob(".*tmp"))
    try:
        store.write(rec)
        raise AssertionError("second write of the same run id must fail")
    except FileExistsError:
        pass


def test_corrupt_record_reported_and_kept(tmp_path):
    store = ResultStore(tmp_path)
    store.write(_rec(ppl_ptb=5.0))
    bad = tmp_path / "broken.json"
    bad.write_text('{"run_id": "x", "stat')
    (tmp_path / "other.json").write_text('{"hello": 1}')
    df = store.load()
    assert len(df) == 1 and len(store.corrupt) == 2
    assert bad.read_text() == '{"run_id": "x", "stat'   # never deleted or rewritten


def test_nan_metric_is_never_stored_as_number(tmp_path):
    path = ResultStore(tmp_path).write(_rec(ppl_ptb=math.nan, ppl_c4=3.0))
    data = json.loads(path.read_text())
    assert data["metrics"] == {"ppl_c4": 3.0}
    assert data["provenance"]["non_finite_metrics"] == ["ppl_ptb"]


def test_load_has_metric_columns_and_find(tmp_path):
    store = ResultStore(tmp_path)
    store.write(_rec(status="failed", h="h1"))
    store.write(_rec(h="h1", ppl_ptb=7.0))
    df = store.load()
    assert set(df["status"]) == {"ok", "failed"} and "ppl_ptb" in df.columns
    assert len(store.find("h1")) == 1 and len(store.find("h1", None)) == 2


def test_config_hash_stable_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
