"""Calibration batches: n samples x seqlen tokens drawn with a seed, cached on disk.

Sampling follows GPTQ: pick a random document longer than seqlen, then a random window
inside it. When fewer than n documents are long enough (the local C4 subset has few
documents over 2,048 tokens) the documents are joined with the EOS token into one
stream and windows are drawn from it at random offsets; the record says which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.inputs.data import calib_documents
from harness.util.hashing import sha256_file

log = logging.getLogger(__name__)


def tokenizer_fingerprint(tok: Any) -> str:
    """What decides the token ids: the whole tokenizers pipeline (model with its merges,
    normalizer, added tokens) where there is one, not only the vocabulary (Gemma's Unigram
    and BPE tokenizers share a vocabulary and split text differently)."""
    backend = getattr(tok, "backend_tokenizer", None)
    pipeline = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    blob = json.dumps([type(tok).__name__, pipeline, tok.bos_token, tok.eos_token])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CalibSpec:
    dataset: str = "c4"
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def key(self, tok_fp: str) -> str:
        return f"{self.dataset}-n{self.n_samples}-s{self.seqlen}-seed{self.seed}-{tok_fp}"


def _sample_docs(docs: list[list[int]], spec: CalibSpec, rng: random.Random) -> list[list[int]]:
    long = [d for d in docs if len(d) > spec.seqlen]
    out = []
    for _ in range(spec.n_samples):
        d = long[rng.randrange(len(long))]
        i = rng.randrange(len(d) - spec.seqlen)
        out.append(d[i:i + spec.seqlen])
    return out


def _sample_stream(docs: list[list[int]], eos: int, spec: CalibSpec,
                   rng: random.Random) -> list[list[int]]:
    stream = [t for d in docs for t in (*d, eos)]
    if len(stream) <= spec.seqlen:
        raise ValueError(f"calibration set {spec.dataset!r} has {len(stream)} tokens, fewer "
                         f"than seqlen {spec.seqlen}")
    starts = [rng.randrange(len(stream) - spec.seqlen) for _ in range(spec.n_samples)]
    return [stream[s:s + spec.seqlen] for s in starts]


def build_calibration(tok: Any, spec: CalibSpec, data_dir: Path | None,
                      allow_hub: bool = False, vocab_size: int | None = None
                      ) -> tuple[Tensor, str]:
    """[n, seqlen] token ids and the sampling strategy used."""
    rng = random.Random(spec.seed)
    if spec.dataset == "random":
        V = vocab_size or len(tok)
        g = torch.Generator().manual_seed(spec.seed)
        return torch.randint(0, V, (spec.n_samples, spec.seqlen), generator=g), "random_tokens"
    texts = calib_documents(spec.dataset, data_dir, allow_hub)
    docs = [tok(t, add_special_tokens=False).input_ids for t in texts if t.strip()]
    if sum(len(d) > spec.seqlen for d in docs) >= spec.n_samples:
        rows, strategy = _sample_docs(docs, spec, rng), "gptq_random_document_window"
    else:
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        rows, strategy = _sample_stream(docs, eos, spec, rng), "concatenated_stream_window"
    return torch.tensor(rows, dtype=torch.long), strategy


CALIB_FORMAT = 2   # 2: <key>.json manifest with the sha256 (1: <key>.txt, no checksum)


def _read_cached(path: Path, spec: CalibSpec, vocab: int | None) -> tuple[Tensor, str]:
    """Cached ids after checking them against their manifest; ValueError otherwise."""
    from safetensors.torch import load_file
    verify_cached(path)
    manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    ids = load_file(str(path))["input_ids"]
    if tuple(ids.shape) != (spec.n_samples, spec.seqlen) or ids.dtype != torch.long:
        raise ValueError(f"shape {tuple(ids.shape)} {ids.dtype}, expected "
                         f"({spec.n_samples}, {spec.seqlen}) int64")
    if vocab is not None and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
        raise ValueError(f"token ids outside [0, {vocab})")
    return ids, str(manifest["strategy"])


def verify_cached(path: Path) -> None:
    """ValueError unless calibration entry `path` (.safetensors) matches its manifest."""
    manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    if manifest.get("format") != CALIB_FORMAT or sha256_file(path) != manifest.get("sha256"):
        raise ValueError("format or sha256 does not match its manifest")


def _write_cached(path: Path, ids: Tensor, strategy: str) -> None:
    """<key>.safetensors then <key>.json (its presence marks a complete entry); a failure
    (full disk, read-only cache) only costs rebuilding next time."""
    from safetensors.torch import save_file
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp, tmp_json = (path.with_name(f".{path.name}.{tag}.tmp"),
                     path.with_name(f".{path.stem}.json.{tag}.tmp"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        save_file({"input_ids": ids.contiguous()}, str(tmp))
        tmp_json.write_text(json.dumps({"format": CALIB_FORMAT, "sha256": sha256_file(tmp),
                                        "strategy": strategy, "shape": list(ids.shape)}),
                            encoding="utf-8")
        os.replace(tmp, path)
        os.replace(tmp_json, path.with_suffix(".json"))
    except OSError as e:
        log.warning("could not cache calibration batches at %s: %s", path, e)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)


def load_calibration(tok: Any, spec: CalibSpec, data_dir: Path | None, cache_dir: Path | None,
                     allow_hub: bool = False, vocab_size: int | None = None,
                     data_fingerprint: str | None = None
                     ) -> tuple[list[Tensor], dict[str, Any]]:
    """Calibration samples as a list of [1, seqlen] tensors, from the cache when present
    and intact (sha256, shape and id range checked; a bad entry is rebuilt with a warning).
    `data_fingerprint` (of the calibration text's content) is part of the cache key: edited
    text never reuses batches drawn from the old one."""
    key = spec.key(tokenizer_fingerprint(tok))
    if data_fingerprint:
        key = f"{key}-d{data_fingerprint[:12]}"
    path = Path(cache_dir) / "calib" / f"{key}.safetensors" if cache_dir else None
    info = {"calib_key": key, **spec.__dict__}
    if path is not None and (path.is_file() or path.with_suffix(".json").is_file()):
        try:
            ids, strategy = _read_cached(path, spec, vocab_size or len(tok))
            log.info("calibration %s loaded from cache", key)
            return list(ids.split(1)), {**info, "strategy": strategy, "cached": True}
        except Exception as e:  # noqa: BLE001 - a bad entry is rebuilt, never used
            log.warning("calibration cache %s discarded (%s: %s); rebuilding", path,
                        type(e).__name__, e)
            for p in (path, path.with_suffix(".json"), path.with_suffix(".txt")):
                p.unlink(missing_ok=True)
    ids, strategy = build_calibration(tok, spec, data_dir, allow_hub, vocab_size)
    if path is not None:
        _write_cached(path, ids, strategy)
    log.info("calibration: %d x %d tokens from %s (%s)", *ids.shape, spec.dataset, strategy)
    return list(ids.split(1)), {**info, "strategy": strategy, "cached": False}
