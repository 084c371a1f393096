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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.inputs.data import calib_documents

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


def load_calibration(tok: Any, spec: CalibSpec, data_dir: Path | None, cache_dir: Path | None,
                     allow_hub: bool = False, vocab_size: int | None = None
                     ) -> tuple[list[Tensor], dict[str, Any]]:
    """Calibration samples as a list of [1, seqlen] tensors, from the cache when present."""
    from safetensors.torch import load_file, save_file

    key = spec.key(tokenizer_fingerprint(tok))
    path = Path(cache_dir) / "calib" / f"{key}.safetensors" if cache_dir else None
    info = {"calib_key": key, **spec.__dict__}
    if path is not None and path.is_file():
        try:
            data = load_file(str(path))
            ids, strategy = data["input_ids"], path.with_suffix(".txt").read_text().strip()
            log.info("calibration %s loaded from cache", key)
            return list(ids.split(1)), {**info, "strategy": strategy, "cached": True}
        except Exception as e:  # corrupt cache: rebuild, never use
            log.warning("calibration cache %s unreadable (%s); rebuilding", path, e)
    ids, strategy = build_calibration(tok, spec, data_dir, allow_hub, vocab_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"input_ids": ids.contiguous()}, str(tmp))
        path.with_suffix(".txt").write_text(strategy)
        os.replace(tmp, path)
    log.info("calibration: %d x %d tokens from %s (%s)", *ids.shape, spec.dataset, strategy)
    return list(ids.split(1)), {**info, "strategy": strategy, "cached": False}
