"""Latency of the run's model: prefill, time to first token, greedy decode with a KV cache,
peak memory. Inputs are random token ids (latency does not depend on the text).

Metrics (b = batch, p = prompt length):
  latency_prefill_ms_b{b}_p{p}  one forward over the prompt, no cache, all logits (median)
  ttft_ms_b{b}_p{p}             prompt forward filling the KV cache + last-position logits +
                                argmax: time until the first new token exists (median)
  peak_mem_mb_prefill_b{b}_p{p}
  decode_tok_s_b{b}             b * (new_tokens - 1) / decode time, after a prefill of
                                decode_prompt_len tokens (prefill excluded; median of repeats)
  decode_ms_per_step_b{b}       one decode step (all b sequences)
  peak_mem_mb_decode_b{b}
Peak memory: CUDA max allocated, or process RSS sampled every 20 ms on CPU.

Decode mode (eval.decode_mode, recorded in provenance.latency.decode_mode with the reason):
  cuda_graph  each one-token step replays a CUDA graph captured over a static KV cache
              (transformers StaticCache; the same for fp16 and runtime models): what a
              serving stack sees, without Python / launch overhead
  eager       Hugging Face decoding with its dynamic KV cache, one Python forward per token
  auto        cuda_graph on a CUDA device, eager elsewhere (CPU has no CUDA graphs)
cuda_graph asked for on a CPU run is refused (ValueError naming the setting).
On CPU the runtime modules run the exact PyTorch references (float64 integer matmuls), so
CPU numbers measure the reference path, not the kernels: provenance says `backend`.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.evals import EvalContext, EvalResult, MetricInfo
from harness.run.provenance import PeakMemory, device_name

log = logging.getLogger(__name__)


DECODE_MODES = ("auto", "eager", "cuda_graph")
# metric kind -> (column label, unit, higher is better, digits), in table column order;
# peak_mem_mb_b{b}: records made before peak memory was split into prefill and decode.
KINDS = {
    "latency_prefill_ms": ("prefill", "ms", False, 2),
    "ttft_ms": ("TTFT", "ms", False, 2),
    "decode_tok_s": ("decode", "tok/s", True, 2),
    "decode_ms_per_step": ("decode step", "ms", False, 2),
    "peak_mem_mb_prefill": ("peak mem prefill", "MB", False, 0),
    "peak_mem_mb_decode": ("peak mem decode", "MB", False, 0),
    "peak_mem_mb": ("peak mem", "MB", False, 0),
}
_NAME = re.compile(rf"^(?P<kind>{'|'.join(KINDS)})_b(?P<batch>\d+)(?:_p(?P<prompt>\d+))?$")


def metric_info(name: str) -> MetricInfo | None:
    """<kind>_b<batch>[_p<prompt len>] (see the module doc); one table row per batch, one
    column per kind x prompt length."""
    m = _NAME.match(name)
    if not m:
        return None
    label, unit, higher, digits = KINDS[m["kind"]]
    prompt = f" p{m['prompt']}" if m["prompt"] else ""
    column = m["kind"] + (f"_p{m['prompt']}" if m["prompt"] else "")
    return MetricInfo("latency", "latency", f"{label}{prompt} ({unit})", unit, higher,
                      digits=digits, kind=m["kind"], subject=column,
                      order=(list(KINDS).index(m["kind"]), int(m["prompt"] or 0)),
                      batch=int(m["batch"]))


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
    decode_mode: str = "auto"

    def __post_init__(self) -> None:
        sizes = (*self.prompt_lens, *self.batches, *self.decode_batches,
                 self.decode_prompt_len, self.new_tokens, self.repeats)
        if any(int(v) < 1 for v in sizes) or self.warmup < 0:
            raise ValueError(f"latency settings must be positive (warmup >= 0): {self}")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"eval.decode_mode={self.decode_mode!r}; use one of {DECODE_MODES}")

    @classmethod
    def from_cfg(cls, cfg: Any) -> LatencySpec:
        return cls(prompt_lens=tuple(int(v) for v in cfg.prompt_lens),
                   batches=tuple(int(v) for v in cfg.batches),
                   decode_batches=tuple(int(v) for v in cfg.decode_batches),
                   decode_prompt_len=int(cfg.decode_prompt_len), new_tokens=int(cfg.new_tokens),
                   warmup=int(cfg.get("warmup", 1)), repeats=int(cfg.get("repeats", 3)),
                   seed=int(cfg.get("seed", 0)),
                   decode_mode=str(cfg.get("decode_mode", cls.decode_mode)))


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


def resolve_decode_mode(requested: str, device: torch.device) -> tuple[str, str]:
    """(mode that runs, why) for eval.decode_mode on `device`."""
    if requested not in DECODE_MODES:
        raise ValueError(f"eval.decode_mode={requested!r}; use one of {DECODE_MODES}")
    if requested == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"eval.decode_mode=cuda_graph needs a CUDA device (this run is on "
                         f"{device.type}); use eval.decode_mode=eager or auto")
    if requested == "auto":
        if device.type == "cuda":
            return "cuda_graph", "auto: CUDA device"
        return "eager", f"auto: no CUDA graphs on {device.type}"
    return requested, "requested"


class StaticDecoder:
    """Greedy decoding over a static KV cache (transformers StaticCache) with fixed input
    buffers tok [b, 1] and pos [1], so one decode step is a fixed sequence of kernels:
    captured once in a CUDA graph (graph=True) and replayed per token; graph=False runs the
    same step eagerly (CPU tests check it against `greedy_decode`)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, device: torch.device,
                 graph: bool):
        from transformers import StaticCache

        self.model, self.device, self.use_graph = model, device, graph
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: Any = None

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        """Prompt forward into the (reset) cache; tok <- first new token, pos <- prompt length."""
        self.cache.reset()
        p = ids.shape[1]
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                         cache_position=torch.arange(p, device=self.device), logits_to_keep=1)
        self.tok.copy_(out.logits[:, -1].argmax(dim=-1, keepdim=True))
        self.pos.fill_(p)
        return self.tok.clone()

    @torch.no_grad()
    def _step(self) -> None:
        out = self.model(input_ids=self.tok, past_key_values=self.cache, use_cache=True,
                         cache_position=self.pos)
        self.tok.copy_(out.logits[:, -1].argmax(dim=-1, keepdim=True))
        self.pos.add_(1)

    def capture(self, ids: Tensor) -> None:
        """Warm up (lazy cache allocation, autotuning, scale checks) on a side stream, then
        capture one step; the warm-up's cache writes are undone by the next prefill."""
        self.prefill(ids)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.prefill(ids)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def step(self) -> Tensor:
        if self.use_graph:
            self.graph.replay()
        else:
            self._step()
        return self.tok

    def decode(self, ids: Tensor, new_tokens: int) -> tuple[Tensor, float]:
        """As `greedy_decode`: (tokens [b, new_tokens], seconds of the new_tokens - 1 steps)."""
        out = [self.prefill(ids)]
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out.append(self.step().clone())
        _sync(self.device)
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


def _decoder(model: nn.Module, ids: Tensor, spec: LatencySpec, device: torch.device,
             mode: str, fallbacks: dict[str, str]) -> Callable[[int], tuple[Tensor, float]]:
    """new_tokens -> (tokens, decode seconds) in the given decode mode. A model whose step
    cannot be captured decodes eagerly; fallbacks[batch] records why (the record says so)."""
    if mode == "cuda_graph":
        dec = StaticDecoder(model, ids.shape[0], spec.decode_prompt_len + spec.new_tokens,
                            device, graph=True)
        try:
            dec.capture(ids)
            return lambda n: dec.decode(ids, n)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - capture is best effort; eager still measures
            fallbacks[f"b{ids.shape[0]}"] = f"eager: CUDA-graph capture failed ({type(e).__name__}: {e})"[:300]
            log.warning("latency: %s", fallbacks[f"b{ids.shape[0]}"])
            torch.cuda.synchronize(device)
    return lambda n: greedy_decode(model, ids, n, device)


def evaluate(ctx: EvalContext, cfg: Any) -> EvalResult:
    spec = LatencySpec.from_cfg(cfg)
    model, device = ctx.model, ctx.device
    if ctx.blockwise:
        raise ValueError(f"latency with placement.mode={ctx.placement} would time weight "
                         "transfers, not the model: run it where the model fits "
                         "(placement.mode=device)")
    vocab = int(model.config.vocab_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(*spec.prompt_lens, spec.decode_prompt_len + spec.new_tokens)
    if max_pos and longest > max_pos:
        raise ValueError(f"latency needs {longest} positions but the model has {max_pos}; "
                         "lower eval.prompt_lens / eval.decode_prompt_len / eval.new_tokens")
    mode, why = resolve_decode_mode(spec.decode_mode, device)
    res = EvalResult()
    backend = backend_label(model, device)
    res.provenance["latency"] = {
        "device_name": device_name(device), "backend": backend, "settings": spec.__dict__,
        "decode_mode": mode, "decode_mode_reason": why, "prefill_mode": "eager",
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
            run = _decoder(model, ids, spec, device, mode,
                           res.provenance["latency"].setdefault("decode_mode_fallback", {}))
            for _ in range(spec.warmup):
                run(min(spec.new_tokens, 2))
            runs = []
            with PeakMemory(device) as mem:
                for _ in range(spec.repeats):
                    runs.append(run(spec.new_tokens)[1])
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
