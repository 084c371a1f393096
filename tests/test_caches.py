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
