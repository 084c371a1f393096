"""Cache integrity: every entry is checked before use, a bad one is discarded and rebuilt
with a warning, and a cache that cannot be written costs only time."""

from __future__ import annotations

import json

import pytest
import torch

from harness.inputs.calib import CalibSpec, load_calibration
from harness.inputs.models import tiny_tokenizer

SPEC = CalibSpec(dataset="random", n_samples=4, seqlen=16, seed=0)


def _calib(cache):
    return load_calibration(tiny_tokenizer(), SPEC, None, cache, vocab_size=259)


@pytest.mark.parametrize("damage", ["rewritten_ids", "flipped_byte", "malformed_manifest",
                                    "no_manifest_old_format", "wrong_shape"])
def test_calibration_cache_damage_is_detected_and_rebuilt(tmp_path, damage, caplog):
    from safetensors.torch import save_file
    ref, info = _calib(tmp_path)
    assert info["cached"] is False
    path = next((tmp_path / "calib").glob("*.safetensors"))
    if damage == "rewritten_ids":          # valid file, other token ids: GPTQ would not notice
        save_file({"input_ids": torch.zeros(4, 16, dtype=torch.long)}, str(path))
    elif damage == "flipped_byte":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "malformed_manifest":
        path.with_suffix(".json").write_text("{oops")
    elif damage == "no_manifest_old_format":
        path.with_suffix(".json").unlink()
        path.with_suffix(".txt").write_text("random_tokens")
    elif damage == "wrong_shape":
        save_file({"input_ids": torch.zeros(2, 16, dtype=torch.long)}, str(path))
        m = json.loads(path.with_suffix(".json").read_text())
        from harness.util.hashing import sha256_file
        path.with_suffix(".json").write_text(json.dumps({**m, "sha256": sha256_file(path)}))
    with caplog.at_level("WARNING"):
        again, info = _calib(tmp_path)
    assert info["cached"] is False and "discarded" in caplog.text
    for a, b in zip(again, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, info = _calib(tmp_path)
    assert info["cached"] is True                     # rebuilt entry is valid


def test_calibration_cache_write_failure_is_harmless(tmp_path, monkeypatch, caplog):
    import harness.inputs.calib as C

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "sha256_file", full_disk)
    with caplog.at_level("WARNING"):
        ids, info = _calib(tmp_path)
    assert len(ids) == 4 and "No space left" in caplog.text
    assert not [p for p in (tmp_path / "calib").iterdir()]     # no partial files left


# ---------------------------------------------------------------- quantized-model cache

QCONFIGS = ["rtn", "smoothquant", "gptq", "awq", "fptq"]


def _quantized(name):
    from harness.inputs.models import tiny_llama
    from methods.arch import ModelSpec
    from methods.catalog import build
    from tests.test_layers import CONFIGS
    calib = [torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(i))
             for i in range(4)]
    model = tiny_llama(hidden_size=64, intermediate_size=128,
                       outliers={"0.input_layernorm": 40.0, "1.mlp.up_proj": 30.0})
    spec = ModelSpec.from_model(model, "tiny")
    method = build(CONFIGS[name])
    return method.quantize(model, spec, calib), spec, method


@pytest.mark.parametrize("name", QCONFIGS)
def test_quantized_cache_stores_codes_and_rebuilds_the_identical_model(tmp_path, name):
    from harness.inputs.models import tiny_llama
    from harness.run.cache import WEIGHTS, CacheEntryError, QuantizedModelCache, tensor_digests
    from methods.layers import FakeQuantLinear
    base = tensor_digests(tiny_llama(hidden_size=64, intermediate_size=128,
                                     outliers={"0.input_layernorm": 40.0,
                                               "1.mlp.up_proj": 30.0}))
    qmodel, spec, method = _quantized(name)
    cache = QuantizedModelCache(tmp_path)
    cache.save("k", {"p": 1}, qmodel, spec, method.artifacts, base_digests=base)
    manifest = cache.read_manifest("k")
    assert "model.embed_tokens.weight" in manifest["from_base"]    # unchanged: not stored
    quantized = [n for n, m in qmodel.named_modules()
                 if type(m) is FakeQuantLinear and m.w_scale is not None]
    assert quantized and sorted(manifest["codes"]) == sorted(quantized)   # no dense fallback
    dense = sum(t.numel() * t.element_size() for t in qmodel.state_dict().values())
    coded = sum(qmodel.get_submodule(n).weight.numel() * 4 for n in quantized)   # fp32 bytes
    assert (tmp_path / "k" / WEIGHTS).stat().st_size < dense - 0.8 * coded   # 4-bit: 1/8
    fresh = tiny_llama(hidden_size=64, intermediate_size=128,
                       outliers={"0.input_layernorm": 40.0, "1.mlp.up_proj": 30.0})
    hit = cache.restore("k", manifest, fresh, spec)
    for (n, a), (m, b) in zip(sorted(hit.model.state_dict().items()),
                              sorted(qmodel.state_dict().items()), strict=True):
        assert n == m and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hit.model(ids).logits, qmodel(ids).logits, rtol=0, atol=0)
    other_base = tiny_llama(hidden_size=64, intermediate_size=128, seed=3)   # another model
    with pytest.raises(CacheEntryError, match="base model differs"):
        cache.restore("k", manifest, other_base, spec)


def test_quantized_cache_evicts_least_recently_used_over_max_gb(tmp_path, caplog):
    import os
    import time

    from harness.run.cache import QuantizedModelCache
    qmodel, spec, method = _quantized("rtn")
    probe = QuantizedModelCache(tmp_path / "probe")
    probe.save("x", {}, qmodel, spec, {})
    size = sum(p.stat().st_size for p in (tmp_path / "probe" / "x").iterdir())
    cache = QuantizedModelCache(tmp_path / "c", max_gb=2.5 * size / 2**30)   # room for two
    for i, key in enumerate(("a", "b")):
        cache.save(key, {}, qmodel, spec, {})
        os.utime(tmp_path / "c" / key / "manifest.json", (time.time() - 100 + i,) * 2)
    cache.touch("a")                                   # a used last: b is the oldest
    with caplog.at_level("WARNING"):
        cache.save("c", {}, qmodel, spec, {})
    assert sorted(d.name for d in cache.entries()) == ["a", "c"]
    assert "least recently used" in caplog.text
    with pytest.raises(ValueError, match="max_gb"):
        QuantizedModelCache(tmp_path, max_gb=0)


def test_quantized_cache_entries_of_an_old_format_are_removed(tmp_path):
    from harness.run.cache import MANIFEST, QuantizedModelCache
    qmodel, spec, method = _quantized("rtn")
    cache = QuantizedModelCache(tmp_path)
    cache.save("old", {}, qmodel, spec, {})
    m = json.loads((tmp_path / "old" / MANIFEST).read_text())
    (tmp_path / "old" / MANIFEST).write_text(json.dumps({**m, "format": 2}))
    cache.save("new", {}, qmodel, spec, {})
    assert [d.name for d in cache.entries()] == ["new"]


def test_quantized_cache_malformed_manifest_is_discarded_not_fatal(tmp_path):
    from harness.run.cache import MANIFEST, CacheEntryError, QuantizedModelCache
    qmodel, spec, method = _quantized("rtn")
    cache = QuantizedModelCache(tmp_path)
    cache.save("k", {}, qmodel, spec, {})
    m = json.loads((tmp_path / "k" / MANIFEST).read_text())
    for bad in ([1, 2], {**m, "weights": None}, {k: v for k, v in m.items() if k != "codes"},
                {**m, "codes": {"model.layers.0.mlp.up_proj": {"packing": "zip"}}},
                {**m, "format": 2}):
        (tmp_path / "k" / MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(CacheEntryError):
            cache.read_manifest("k")


def test_quantized_cache_save_failure_is_harmless(compose_cfg, monkeypatch):
    import harness.run.cache as cache_mod
    from harness.run.pipeline import run_one
    from tests.conftest import TINY_QUICK

    def no_space(*a, **k):
        raise RuntimeError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(cache_mod, "save_safetensors_file", no_space)
    record = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a16",
                                 "bits.group_size=32"))
    assert record.status == "ok" and "ppl_ptb" in record.metrics


def test_ptqbench_cache_list_verify_clear(tmp_path, capsys):
    from harness.run.cache import WEIGHTS, QuantizedModelCache
    from harness.run.cache_cli import main
    with pytest.raises(SystemExit) as e:    # a mistyped --dir read as "0 entries"
        main(["--dir", str(tmp_path / "typo"), "list"])
    assert e.value.code == 2 and "--dir" in capsys.readouterr().err
    qmodel, spec, method = _quantized("rtn")
    qc = QuantizedModelCache(tmp_path / "quantized")
    qc.save("good", {"model": {"name": "tiny"}, "method": {"name": "rtn", "w_bits": 4,
                                                            "a_bits": 8}}, qmodel, spec, {})
    qc.save("bad", {}, qmodel, spec, {})
    _calib(tmp_path)
    assert main(["--dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "quantized" in out and "good" in out and "tiny rtn w4a8" in out and "calib" in out
    data = bytearray((tmp_path / "quantized" / "bad" / WEIGHTS).read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "quantized" / "bad" / WEIGHTS).write_bytes(bytes(data))
    assert main(["--dir", str(tmp_path), "verify"]) == 1
    assert "BAD quantized  bad" in capsys.readouterr().out
    assert main(["--dir", str(tmp_path), "verify", "--fix"]) == 0
    assert main(["--dir", str(tmp_path), "verify"]) == 0
    assert [d.name for d in qc.entries()] == ["good"]
    assert main(["--dir", str(tmp_path), "clear", "good"]) == 0 and qc.entries() == []
    with pytest.raises(SystemExit):
        main(["--dir", str(tmp_path), "clear", "nope"])
    assert main(["--dir", str(tmp_path), "clear", "--all"]) == 0
    assert not list((tmp_path / "calib").glob("*.safetensors"))
