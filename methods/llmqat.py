"""LLM-QAT: data-free quantization-aware training (Liu et al., 2023, arXiv 2305.17888).

1. Data: the full-precision model writes its own training text. Each sequence starts from a
   token drawn uniformly from the vocabulary (special tokens excluded), the next
   `greedy_tokens` tokens are the argmax, the rest are sampled from softmax(logits / T).
   Generated in batches with a KV cache, cached on disk by (model, seed, count, length,
   greedy_tokens, temperature, batch size: sampling draws from one seeded stream) so
   sweeps reuse it. EOS is suppressed so every sequence has
   `seq_len` tokens (the paper stops at EOS; fixed lengths batch without padding).
2. Student: every block linear fake-quantizes W per output channel, symmetric MinMax
   (`fake_quantize_weight_ste`), and its input X per token; with kv_bits the cached K (after
   RoPE) and V too (methods/kvcache.py). Rounding passes gradients straight through, zero
   outside the clipping range. Teacher: a frozen copy of the fp model.
3. Loss: soft cross-entropy sum_v -p_T(v) log p_S(v) to the teacher's next-token
   distribution (temperature kd_temperature), averaged over tokens; all parameters trained
   (as the paper), AdamW, cosine decay after a linear warm-up; gradient checkpointing of the
   decoder blocks.
4. Result: each trained linear rounded once more on the same grid into a FakeQuantLinear
   (dynamic per-token activations), so to_runtime, the checkpoint and the quantized-model
   cache treat it like any other method's output.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from methods.arch import ModelSpec
from methods.base import Calib, ConfigError, Method, QuantConfig, register
from methods.figures import save_figure
from methods.kvcache import attach_kv_cache_quant, calibrate_kv_cache, detach_kv_cache_quant
from methods.layers import config_for, iter_block_linears, replace_linear, round_and_wrap
from methods.primitives import fake_quantize_per_token_ste, fake_quantize_weight_ste

log = logging.getLogger(__name__)

DATA_FORMAT = 1     # bump when the generation procedure changes (cache key)


@dataclass(frozen=True)
class LLMQATConfig(QuantConfig):
    w_bits: int = 4
    a_bits: int = 8
    act_mode: str = "dynamic_token"     # per-token activations (the paper's setting)
    n_samples: int = 64                 # generated sequences
    seq_len: int = 256                  # tokens per sequence
    greedy_tokens: int = 4              # argmax for tokens 2 .. 1 + greedy_tokens (paper: 3-5)
    temperature: float = 1.0            # sampling temperature for the rest
    gen_batch_size: int = 16
    data_seed: int = 0
    steps: int = 100                    # optimizer steps
    batch_size: int = 1                 # sequences per step
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    kd_temperature: float = 1.0
    grad_checkpointing: bool = True
    train_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_mode != "dynamic_token":
            raise ConfigError(f"llmqat act_mode={self.act_mode!r}: LLM-QAT quantizes "
                              "activations per token; use act_mode=dynamic_token")
        if not self.symmetric:
            raise ConfigError("llmqat symmetric=false: LLM-QAT uses symmetric MinMax weights")
        if self.w_grid != "narrow":
            raise ConfigError(f"llmqat w_grid={self.w_grid!r}: training rounds on the narrow "
                              "grid max|W| / (2^(b-1) - 1); use w_grid=narrow")
        for key in ("n_samples", "seq_len", "gen_batch_size", "steps", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"llmqat {key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.greedy_tokens < self.seq_len:
            raise ConfigError(f"llmqat greedy_tokens={self.greedy_tokens} must be in "
                              f"[0, seq_len={self.seq_len})")
        if self.batch_size > self.n_samples:
            raise ConfigError(f"llmqat batch_size={self.batch_size} exceeds "
                              f"n_samples={self.n_samples}")
        for key in ("lr", "temperature", "kd_temperature"):
            if not float(getattr(self, key)) > 0:
                raise ConfigError(f"llmqat {key}={getattr(self, key)} must be > 0")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"llmqat warmup_steps={self.warmup_steps} must be in "
                              f"[0, steps={self.steps})")


# ------------------------------------------------------------------ data-free generation

def special_token_ids(model: nn.Module) -> set[int]:
    cfg = model.config
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, key, None)
        ids.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
    return {int(i) for i in ids}


@torch.no_grad()
def generate_sequences(model: nn.Module, n: int, length: int, greedy_tokens: int,
                       temperature: float, batch_size: int, seed: int) -> Tensor:
    """[n, length] int64 token ids written by `model` (see the module docstring)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    banned = sorted(i for i in special_token_ids(model) if i < vocab)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    first_choices = allowed.nonzero().squeeze(1)
    firsts = first_choices[torch.randint(len(first_choices), (n,), generator=gen)]
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=n * length, desc="llmqat generate", unit="tok", leave=False)
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            ids = firsts[start:start + b, None].to(device)
            step_in, cache = ids, None
            for t in range(1, length):
                res = model(input_ids=step_in, past_key_values=cache, use_cache=True)
                cache = res.past_key_values
                logits = res.logits[:, -1].float().cpu()
                logits[:, banned] = float("-inf")
                if t <= greedy_tokens:
                    nxt = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                step_in = nxt[:, None].to(device)
                ids = torch.cat([ids, step_in], dim=1)
                bar.update(b)
            bar.update(b)
            out.append(ids.cpu())
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)


def data_key(model_name: str, cfg: LLMQATConfig, vocab: int) -> str:
    parts = {"model": model_name, "vocab": vocab, "seed": cfg.data_seed, "count": cfg.n_samples,
             "length": cfg.seq_len, "greedy": cfg.greedy_tokens,
             "temperature": float(cfg.temperature), "batch": cfg.gen_batch_size,
             "format": DATA_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_or_generate(model: nn.Module, model_name: str, cfg: LLMQATConfig,
                     cache_dir: Path | None) -> tuple[Tensor, dict[str, Any]]:
    """The generated sequences, from `cache_dir/llmqat_data/` when present there."""
    vocab = model.get_output_embeddings().weight.shape[0]
    key = data_key(model_name, cfg, vocab)
    path = None if cache_dir is None else Path(cache_dir) / "llmqat_data" / f"{key}.pt"
    info: dict[str, Any] = {"key": key, "n_samples": cfg.n_samples, "seq_len": cfg.seq_len,
                            "greedy_tokens": cfg.greedy_tokens, "seed": cfg.data_seed}
    if path is not None and path.is_file():
        data = torch.load(path, weights_only=True)
        if tuple(data.shape) == (cfg.n_samples, cfg.seq_len):
            return data.long(), {**info, "cached": True, "gen_time_s": 0.0}
        log.warning("llmqat data cache %s has shape %s; regenerating", path, tuple(data.shape))
    t0 = time.perf_counter()
    data = generate_sequences(model, cfg.n_samples, cfg.seq_len, cfg.greedy_tokens,
                              cfg.temperature, cfg.gen_batch_size, cfg.data_seed)
    info.update(cached=False, gen_time_s=round(time.perf_counter() - t0, 2))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save(data.to(torch.int32), tmp)
        os.replace(tmp, path)
    return data, info


# ------------------------------------------------------------------ student

class QATLinear(nn.Module):
    """Training-time linear: y = Q_a(X) Q_w(W)^T + b with straight-through rounding."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = (None if linear.bias is None
                     else nn.Parameter(linear.bias.detach().clone()))
        self.cfg = cfg

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        if c.quantizes_activations:
            x = fake_quantize_per_token_ste(x, c.a_bits)
        w = (fake_quantize_weight_ste(self.weight, c.w_bits, c.group_size)
             if c.quantizes_weights else self.weight)
        return F.linear(x, w, self.bias)

    def to_linear(self) -> nn.Linear:
        n, k = self.weight.shape
        lin = nn.Linear(k, n, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor,
                       temperature: float = 1.0) -> Tensor:
    """mean over tokens of sum_v -softmax(t / T)_v * log_softmax(s / T)_v; logits [..., V]."""
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(p_t * log_p_s).sum(dim=-1).mean()


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor,
                  temperature: float = 1.0) -> Tensor:
    """soft cross-entropy minus the teacher's entropy: KL(p_T || p_S), >= 0, 0 when equal.
    Same gradient as soft_cross_entropy; the number the loss curve and record show."""
    log_p_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, batches: list[Tensor],
            temperature: float) -> float:
    was = student.training
    student.eval()
    try:
        vals = [float(kl_to_teacher(student(input_ids=b, use_cache=False).logits,
                                    teacher(input_ids=b, use_cache=False).logits, temperature))
                for b in batches]
    finally:
        student.train(was)
    return sum(vals) / len(vals)


def cosine_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return f


def plot_loss(losses: list[float], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(fp teacher || student), nats/token")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


@register(LLMQATConfig)
class LLMQAT(Method[LLMQATConfig]):
    name = "llmqat"

    def _student(self, model: nn.Module, spec: ModelSpec) -> list[str]:
        """Swap the block linears for QATLinear (keep_fp / keep_w8 as every method)."""
        names = []
        for _, _, full, lin in iter_block_linears(model, spec):
            if (cfg := config_for(self.config, full)) is not None:
                replace_linear(model, full, QATLinear(lin, cfg))
                names.append(full)
        return names

    def _finish(self, model: nn.Module, names: list[str]) -> None:
        """QATLinear -> FakeQuantLinear on the same (MinMax, per-channel) grid."""
        for full in names:
            qat = model.get_submodule(full)
            replace_linear(model, full, round_and_wrap(qat.to_linear(), qat.cfg))

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        cfg = self.config
        data, data_info = load_or_generate(model, spec.name, cfg, self.cache_dir)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        names = self._student(model, spec)
        device = next(model.parameters()).device
        if cfg.quantizes_kv_cache:
            attach_kv_cache_quant(model, spec, cfg.kv_bits, cfg.kv_granularity)
            if cfg.kv_granularity == "per_head":
                calibrate_kv_cache(model, [d[None] for d in data], 16)
        held = [data[i:i + 1].to(device) for i in range(min(4, len(data)))]
        t0 = time.perf_counter()
        try:
            kl_before = mean_kl(model, teacher, held, cfg.kd_temperature)
            losses = self._train(model, teacher, data, device)
            kl_after = mean_kl(model, teacher, held, cfg.kd_temperature)
        finally:
            detach_kv_cache_quant(model, spec)
            del teacher
        train_time = time.perf_counter() - t0
        self._finish(model, names)
        model.eval().requires_grad_(False)
        self.artifacts["llmqat"] = {
            "data": data_info, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "tokens_trained": cfg.steps * cfg.batch_size * cfg.seq_len,
            "train_time_s": round(train_time, 2), "lr": cfg.lr,
            "loss": "KL(teacher || student) per step (soft cross-entropy minus the "
                    "teacher's entropy: same gradient)",
            "kl_per_step": [round(v, 5) for v in losses],
            "kl_before": round(kl_before, 5), "kl_after": round(kl_after, 5),
            "kl_eval_sequences": len(held), "trained_linears": len(names),
            "kv_bits_in_training": cfg.kv_bits,
        }
        log.info("llmqat: %d steps in %.0f s, KL to the teacher %.4f -> %.4f", cfg.steps,
                 train_time, kl_before, kl_after)
        return model

    def _train(self, model: nn.Module, teacher: nn.Module, data: Tensor,
               device: torch.device) -> list[float]:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.train_seed)
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg.steps, cfg.warmup_steps))
        use_ckpt = cfg.grad_checkpointing and getattr(model, "supports_gradient_checkpointing",
                                                       False)
        if use_ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        order: list[int] = []
        losses: list[float] = []
        try:
            for _ in tqdm(range(cfg.steps), desc="llmqat train", leave=False):
                if len(order) < cfg.batch_size:
                    order += torch.randperm(len(data), generator=gen).tolist()
                batch = data[order[:cfg.batch_size]].to(device)
                del order[:cfg.batch_size]
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch, use_cache=False).logits
                s_logits = model(input_ids=batch, use_cache=False).logits
                loss = soft_cross_entropy(s_logits, t_logits, cfg.kd_temperature)
                kl = kl_to_teacher(s_logits.detach(), t_logits, cfg.kd_temperature)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"llmqat KD loss is {float(loss)} at step "
                                             f"{len(losses) + 1}; lower method.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(kl))
        finally:
            if use_ckpt:
                model.gradient_checkpointing_disable()
            model.eval()
        return losses

    def write_artifacts(self, run_dir: str | Path) -> dict[str, str]:
        """The training loss curve as a PNG in run_dir."""
        info = self.artifacts.get("llmqat")
        if not info:
            return {}
        c = self.config
        title = (f"LLM-QAT {c.bits_label}: {info['steps']} steps x {c.batch_size} x "
                 f"{c.seq_len} tokens, {info['train_time_s']:.0f} s; held-out KL "
                 f"{info['kl_before']:.3g} -> {info['kl_after']:.3g}")
        return {"llmqat_loss_plot": str(plot_loss(info["kl_per_step"], Path(run_dir) /
                                                  "llmqat_loss.png", title))}
