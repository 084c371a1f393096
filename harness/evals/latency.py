"""Latency of the run's model: prefill, time to first token, greedy decode with a KV cache,
peak memory. Inputs are random token ids (latency does not depend on the text).

Metrics (b = batch, p = prompt length):
  latency_prefill_ms_b{b}_p{p}  one forward over the prompt, no cache, all logits (median)
  ttft_ms_b{b}_p{p}             prompt forward filling the KV cache + last-position logits +
                                argmax: time until the first new token exists (median)
  peak_mem_mb_prefill_b{b}_p{p}
  decode_tok_s_b{b}             b * new_tokens / decode time, after a prefill of
                                decode_prompt_len tokens (prefill excluded; median of repeats)
  decode_ms_per_step_b{b}       one decode step (all b sequences)
  peak_mem_mb_decode_b{b}
Peak memory: CUDA max allocated, or process RSS sampled every 20 ms on CPU.
On CPU the runtime modules run the exact PyTorch references (float64 integer matmuls), so
CPU numbers measure the reference path, not the kernels: provenance says `backend`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.evals import EvalContext, EvalResult
from harness.run.provenance import PeakMemory, device_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencySpec:
    prompt_lens: tuple[int, ...]
    batches: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_prompt_len: int
    new_tokens: int
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = (*self.prompt_lens, *self.batches, *self.decode_batches,
                 self.decode_prompt_len, self.new_tokens, self.repeats)
        if any(int(v) < 1 for v in sizes) or self.warmup < 0:
            raise ValueError(f"latency settings must be positive (warmup >= 0): {self}")

    @classmethod
    def from_cfg(cls, cfg: Any) -> LatencySpec:
        return cls(prompt_lens=tuple(int(v) for v in cfg.prompt_lens),
                   batches=tuple(int(v) for v in cfg.batches),
                   decode_batches=tuple(int(v) for v in cfg.decode_batches),
                   decode_prompt_len=int(cfg.decode_prompt_len), new_tokens=int(cfg.new_tokens),
                   warmup=int(cfg.get("warmup", 1)), repeats=int(cfg.get("repeats", 3)),
                   seed=int(cfg.get("seed", 0)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn: Callable[[nn.Module, Tensor], Any], model: nn.Module, ids: Tensor,
              device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms of `repeats` calls fn(model, ids) after `warmup`, peak memory MB of them)."""
    for _ in range(warmup):
        fn(model, ids)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn(model, ids)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), mem.peak_mb


def _prompt(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


@torch.no_grad()
def prefill(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def first_token(model: nn.Module, ids: Tensor) -> tuple[Tensor, Any]:
    """Prompt forward filling the KV cache -> (next token [b, 1], cache)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(dim=-1, keepdim=True), out.past_key_values


@torch.no_grad()
def greedy_decode(model: nn.Module, ids: Tensor, new_tokens: int, device: torch.device
                  ) -> tuple[Tensor, float]:
    """Greedy generation with a KV cache -> (tokens [b, new_tokens], decode seconds).
    The first token comes from the prefill (not timed); the other new_tokens - 1 from
    one-token steps (timed)."""
    tok, cache = first_token(model, ids)
    out = [tok]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        step = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok, cache = step.logits[:, -1].argmax(dim=-1, keepdim=True), step.past_key_values
        out.append(tok)
    _sync(device)
    return torch.cat(out, dim=1), time.perf_counter() - t0


def backend_label(model: nn.Module, device: torch.device) -> str:
    """Which code runs the linears: kernels, references, simulation or plain fp."""
    from kernels.ops import triton_available
    from methods.layers import FakeQuantLinear
    from methods.runtime import RuntimeLinear

    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, RuntimeLinear) for k in kinds):
        if device.type == "cuda":
            return "triton" if triton_available() else "reference-cuda"
        return "reference-cpu"
    if FakeQuantLinear in kinds:
        return "simulated-fake-quant"
    return "torch-fp"


def evaluate(ctx: EvalContext, cfg: Any) -> EvalResult:
    spec = LatencySpec.from_cfg(cfg)
    model, device = ctx.model, ctx.device
    vocab = int(model.config.vocab_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(*spec.prompt_lens, spec.decode_prompt_len + spec.new_tokens)
    if max_pos and longest > max_pos:
        raise ValueError(f"latency needs {longest} positions but the model has {max_pos}; "
                         "lower eval.prompt_lens / eval.decode_prompt_len / eval.new_tokens")
    res = EvalResult()
    backend = backend_label(model, device)
    res.provenance["latency"] = {
        "device_name": device_name(device), "backend": backend, "settings": spec.__dict__,
        "peak_memory": "cuda max allocated" if device.type == "cuda" else "process RSS"}
    if backend == "reference-cpu":
        log.warning("latency on CPU measures the PyTorch reference path, not the kernels")
    points = [(b, p) for b in spec.batches for p in spec.prompt_lens]
    for b, p in tqdm(points, desc="latency prefill", leave=False):
        key = f"b{b}_p{p}"
        try:
            ids = _prompt(b, p, vocab, spec.seed, device)
            ms, mem = _timed_ms(prefill, model, ids, device, spec.warmup, spec.repeats)
            res.metrics[f"latency_prefill_ms_{key}"] = ms
            res.metrics[f"peak_mem_mb_prefill_{key}"] = mem
            ms, _ = _timed_ms(first_token, model, ids, device, spec.warmup, spec.repeats)
            res.metrics[f"ttft_ms_{key}"] = ms
        except torch.OutOfMemoryError as e:
            res.errors[f"prefill_{key}"] = f"out of memory: {e}"
    for b in tqdm(spec.decode_batches, desc="latency decode", leave=False):
        try:
            ids = _prompt(b, spec.decode_prompt_len, vocab, spec.seed, device)
            for _ in range(spec.warmup):
                greedy_decode(model, ids, min(spec.new_tokens, 2), device)
            runs = []
            with PeakMemory(device) as mem:
                for _ in range(spec.repeats):
                    runs.append(greedy_decode(model, ids, spec.new_tokens, device)[1])
            steps = spec.new_tokens - 1
            sec = statistics.median(runs)
            if steps:
                res.metrics[f"decode_tok_s_b{b}"] = b * steps / sec
                res.metrics[f"decode_ms_per_step_b{b}"] = sec / steps * 1e3
            res.metrics[f"peak_mem_mb_decode_b{b}"] = mem.peak_mb
        except torch.OutOfMemoryError as e:
            res.errors[f"decode_b{b}"] = f"out of memory: {e}"
    log.info("latency on %s (%s): %s", res.provenance["latency"]["device_name"], backend,
             {k: round(v, 2) for k, v in res.metrics.items()})
    return res
