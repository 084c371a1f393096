"""End-to-end LLaMA-shaped decoder (random weights): fp16 vs W4A8 decode and prefill."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels.bench.gemm import GROUP_SIZE, Impl
from kernels.bench.timing import Timer

E2E_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000, "decode_ctx": 512}


class Decoder:
    """LLaMA-shaped decoder with random weights: per layer RMSNorm, fused q/k/v linear,
    rotary embedding, SDPA attention over a preallocated KV cache, o linear, RMSNorm, fused
    gate/up linear, SiLU-gate, down linear, residuals; final RMSNorm + fp16 lm_head on the
    last position. `linear` is fp16 (F.linear), W4A8 (kernels.ops.w4a8_linear: per-token
    int8 activation quantization + W4A8 GEMM, the runtime modules' path) or W4A8 with
    two-level weight scales (`w4a8_2l`: ops.w4a8_two_level_linear). q/k/v and gate/up
    are fused into one linear each in both variants (one activation quantization per input).

    Shapes: hidden H, heads H/128, intermediate I; caches [layers, B, heads, ctx, 128]."""

    HEAD_DIM = 128

    def __init__(self, dims: dict, layers: int, quant: str, device: str, max_batch: int,
                 max_ctx: int, impl: Impl, seed: int = 0):
        h, i = dims["hidden"], dims["intermediate"]
        self.h, self.heads, self.quant, self.impl = h, h // self.HEAD_DIM, quant, impl
        g = torch.Generator(device=device).manual_seed(seed)

        def linear(n, k):
            if quant == "fp16":
                return (torch.randn(n, k, device=device, generator=g) * 0.02).half()
            codes = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8, generator=g)
            if quant == "w4a8_2l":  # s1 * s2 ~ the group scales below
                return (codes, (torch.rand(n, device=device, generator=g) * 2e-4).half(),
                        torch.randint(1, 16, (n, k // GROUP_SIZE), device=device, dtype=torch.uint8, generator=g))  # fmt: skip
            return (codes, (torch.rand(n, k // GROUP_SIZE, device=device, generator=g) * 2e-3).half())

        self.layers = [{"qkv": linear(3 * h, h), "o": linear(h, h), "gate_up": linear(2 * i, h),
                        "down": linear(h, i), "ln1": torch.ones(h, device=device, dtype=torch.half),
                        "ln2": torch.ones(h, device=device, dtype=torch.half)}
                       for _ in range(layers)]  # fmt: skip
        self.ln_f = torch.ones(h, device=device, dtype=torch.half)
        self.lm_head = (torch.randn(dims.get("vocab", 32000), h, device=device, generator=g) * 0.02).half()
        shape = (layers, max_batch, self.heads, max_ctx, self.HEAD_DIM)
        self.k_cache = torch.zeros(shape, device=device, dtype=torch.half)
        self.v_cache = torch.zeros(shape, device=device, dtype=torch.half)
        inv = 1.0 / (10000 ** (torch.arange(0, self.HEAD_DIM, 2, device=device).float() / self.HEAD_DIM))
        ang = torch.outer(torch.arange(max_ctx, device=device).float(), inv)
        self.cos, self.sin = ang.cos().half(), ang.sin().half()

    def weight_bytes(self) -> int:
        ts = [t for layer in self.layers for v in layer.values() for t in (v if isinstance(v, tuple) else (v,))]
        return sum(t.numel() * t.element_size() for t in [*ts, self.ln_f, self.lm_head])

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        if self.quant == "fp16":
            return F.linear(x, w)
        from kernels import ops

        backend = "auto" if x.is_cuda else "reference"
        if self.quant == "w4a8_2l":
            return ops.w4a8_two_level_linear(x, *w, None, GROUP_SIZE, backend=backend)
        return ops.w4a8_linear(x, w[0], w[1], GROUP_SIZE, backend=backend)

    @staticmethod
    def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    def rope(self, t: torch.Tensor, pos: int) -> torch.Tensor:  # t [B, heads, T, 128]
        cos, sin = self.cos[pos:pos + t.shape[2]], self.sin[pos:pos + t.shape[2]]
        t1, t2 = t[..., ::2], t[..., 1::2]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x [B, T, H] hidden states of positions pos..pos+T-1 -> logits [B, vocab] of the last."""
        b, t, h = x.shape
        for li, layer in enumerate(self.layers):
            qkv = self.linear(self.rms(x, layer["ln1"]), layer["qkv"])
            q, k, v = (z.view(b, t, self.heads, self.HEAD_DIM).transpose(1, 2) for z in qkv.split(h, dim=-1))
            q, k = self.rope(q, pos), self.rope(k, pos)
            kc, vc = self.k_cache[li, :b], self.v_cache[li, :b]
            kc[:, :, pos:pos + t].copy_(k)
            vc[:, :, pos:pos + t].copy_(v)
            a = F.scaled_dot_product_attention(q, kc[:, :, :pos + t], vc[:, :, :pos + t], is_causal=t > 1)
            x = x + self.linear(a.transpose(1, 2).reshape(b, t, h), layer["o"])
            gate, up = self.linear(self.rms(x, layer["ln2"]), layer["gate_up"]).chunk(2, dim=-1)
            x = x + self.linear(F.silu(gate) * up, layer["down"])
        return F.linear(self.rms(x[:, -1], self.ln_f), self.lm_head)


QUANTS = ("fp16", "w4a8+quant", "w4a8_2l+quant")


def bench_e2e(device: str, timer: Timer, impl: Impl, layers: int, dims: dict,
              decode_batches: list[int], decode_ctx: int, prefill_len: int,
              eager: Timer | None = None) -> dict:
    """Decode step (batch b, one new token after decode_ctx cached ones) and prefill
    (batch 1, prefill_len tokens) of a LLaMA-shaped decoder, fp16 vs W4A8 (+ activation quant)
    with group scales and with two-level scales. tokens/s = b / decode-step time; speedup:
    fp16 / w4a8+quant (speedup_2l: fp16 / w4a8_2l+quant)."""
    res = {"layers": layers, **dims, "decode_ctx": decode_ctx, "prefill_len": prefill_len,
           "model": "Decoder (fused qkv / gate_up, SDPA, RoPE, RMSNorm; fp16 lm_head)",
           "ms": {}, "speedup": {}, "speedup_2l": {}, "tok_s": {}, "weight_gb": {}, "ms_eager": {}}  # fmt: skip
    max_ctx = max(decode_ctx + 1, prefill_len)
    g = torch.Generator(device=device).manual_seed(1)
    cases = [(f"decode_b{b}", b, 1, decode_ctx) for b in decode_batches] + [(f"prefill_{prefill_len}", 1, prefill_len, 0)]
    for quant in QUANTS:
        model = Decoder(dims, layers, quant.removesuffix("+quant"), device, max(decode_batches),
                        max_ctx, impl)  # fmt: skip
        res["weight_gb"][quant] = model.weight_bytes() / 1e9
        for name, b, t, pos in cases:
            x = (torch.randn(b, t, dims["hidden"], device=device, generator=g) * 0.5).half()
            step = functools.partial(model.forward, x, pos)
            res["ms"].setdefault(name, {})[quant] = timer(step)
            if eager is not None:
                res["ms_eager"].setdefault(name, {})[quant] = eager(step)
        del model, step
        if device == "cuda":
            torch.cuda.empty_cache()
    for name, b, _, _ in cases:
        t16, t4 = res["ms"][name]["fp16"], res["ms"][name]["w4a8+quant"]
        res["speedup"][name] = t16 / t4
        res["speedup_2l"][name] = t16 / res["ms"][name]["w4a8_2l+quant"]
        if name.startswith("decode"):
            res["tok_s"][name] = {q: b / (ms * 1e-3) for q, ms in res["ms"][name].items()}
        line = f"[e2e {layers} layers {name}] " + " ".join(f"{q}={res['ms'][name][q]:.3f}ms" for q in QUANTS)
        line += f" speedup={t16 / t4:.2f}x two-level={res['speedup_2l'][name]:.2f}x"
        if name in res["ms_eager"]:
            line += " | eager " + " ".join(f"{q}={v:.3f}ms" for q, v in res["ms_eager"][name].items())
        print(line, flush=True)
    return res

