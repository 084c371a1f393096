"""Perplexity with the GPTQ protocol (not lm-eval's word perplexity).

The whole evaluation text is tokenized once; it is cut into n = floor(T / L)
non-overlapping windows of L = seqlen tokens (C4: the first 256 x L tokens only);
ppl = exp(mean over windows of the window's mean next-token NLL), which equals GPTQ's
exp(sum_i loss_i * L / (n * L)). Families that need BOS (Gemma) get BOS as the first
token of every window, followed by L - 1 text tokens.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from harness.evals import EvalContext, EvalResult, MetricInfo
from harness.inputs.data import eval_text
from methods.arch import ModelSpec
from methods.blockwise import blockwise_logits

log = logging.getLogger(__name__)
C4_MAX_WINDOWS = 256
# The datasets eval_text knows, in the order papers print them.
DATASET_LABELS = {"wikitext2": "WikiText-2", "c4": "C4", "ptb": "PTB"}


def metric_name(dataset: str) -> str:
    return f"ppl_{dataset}"


def metric_info(name: str) -> MetricInfo | None:
    """ppl_<dataset>: GPTQ-protocol perplexity, lower is better, no stderr."""
    dataset = name.removeprefix("ppl_")
    if name == dataset or dataset not in DATASET_LABELS:
        return None
    return MetricInfo("ppl", "perplexity", DATASET_LABELS[dataset], subject=dataset,
                      order=(list(DATASET_LABELS).index(dataset),))


def make_windows(ids: Tensor, seqlen: int, bos_id: int | None = None,
                 max_tokens: int | None = None) -> Tensor:
    """ids [T] -> [n, seqlen] non-overlapping windows (a trailing partial window is dropped)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    step = seqlen - 1 if bos_id is not None else seqlen
    n = ids.numel() // step
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    win = ids[: n * step].view(n, step)
    if bos_id is not None:
        win = torch.cat([torch.full((n, 1), bos_id, dtype=win.dtype), win], dim=1)
    return win


def _batch_nll(logits: Tensor, batch: Tensor, first: int, desc: str) -> Tensor:
    """logits [b, L, V], batch [b, L] -> mean next-token NLL of each window [b] (fp32)."""
    logits = logits[:, :-1].float()
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"non-finite logits in {desc} windows "
                                 f"{first}..{first + len(batch) - 1}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                           batch[:, 1:].to(logits.device).reshape(-1),
                           reduction="none").view(batch.shape[0], -1).mean(dim=1).cpu()


@torch.no_grad()
def window_nlls(model: torch.nn.Module, windows: Tensor, batch_size: int = 1,
                desc: str = "ppl") -> Tensor:
    """Mean next-token NLL (fp32) of each window [n], the whole model on its device."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
        batch = windows[i:i + batch_size].to(device)
        out.append(_batch_nll(model(input_ids=batch, use_cache=False).logits, batch, i, desc))
    return torch.cat(out)


@torch.no_grad()
def blockwise_window_nlls(model: torch.nn.Module, spec: ModelSpec, windows: Tensor,
                          device: torch.device, desc: str = "ppl") -> Tensor:
    """window_nlls for a model that does not fit `device`: all windows through block i, then
    block i+1 (methods.blockwise.blockwise_logits); the same numbers as window_nlls."""
    samples = [w[None] for w in windows]
    return torch.cat([_batch_nll(logits, samples[j], j, desc)
                      for j, logits in blockwise_logits(model, spec, samples, device, desc)])


def perplexity(nlls: Tensor) -> float:
    return math.exp(nlls.double().mean().item())


def tokenize_text(tok: Any, text: str) -> Tensor:
    max_len = getattr(tok, "model_max_length", None)
    try:
        tok.model_max_length = int(1e12)  # a whole corpus on purpose; silence the warning
        return torch.tensor(tok(text).input_ids, dtype=torch.long)
    finally:
        if max_len is not None:
            tok.model_max_length = max_len


def evaluate(ctx: EvalContext, cfg: Any) -> EvalResult:
    res = EvalResult()
    seqlen, cap = int(cfg.seqlen), cfg.get("max_windows")
    bos = ctx.tokenizer.bos_token_id if ctx.spec.table.needs_bos else None
    for name in cfg.datasets:
        try:
            t0 = time.perf_counter()
            ids = tokenize_text(ctx.tokenizer, eval_text(name, ctx.data_dir,
                                                         bool(cfg.get("allow_hub", False))))
            max_tokens = C4_MAX_WINDOWS * seqlen if name == "c4" else None
            windows = make_windows(ids, seqlen, bos, max_tokens)
            n_total = len(windows)
            if cap:
                windows = windows[: int(cap)]
            if ctx.blockwise:
                nlls = blockwise_window_nlls(ctx.model, ctx.spec, windows, ctx.device,
                                             desc=f"ppl {name}")
            else:
                nlls = window_nlls(ctx.model, windows, int(cfg.get("batch_size", 1)),
                                   desc=f"ppl {name}")
            ppl = perplexity(nlls)
            if not math.isfinite(ppl):
                raise FloatingPointError(f"perplexity on {name} is {ppl} (non-finite loss)")
            res.metrics[metric_name(name)] = ppl
            res.provenance[metric_name(name)] = {
                "seqlen": seqlen, "windows": len(windows), "windows_available": n_total,
                "tokens": int(windows.numel()), "bos_per_window": bos is not None,
                "blockwise": ctx.blockwise,
                "seconds": time.perf_counter() - t0}
            log.info("ppl %s = %.3f (%d/%d windows of %d)", name, ppl, len(windows), n_total,
                     seqlen)
        except (FileNotFoundError, ValueError, FloatingPointError) as e:
            res.errors[metric_name(name)] = f"{type(e).__name__}: {e}"
            log.error("ppl %s failed: %s", name, e)
    return res
