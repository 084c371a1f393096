"""GEMM and end-to-end latency benchmark: fp16 cuBLAS vs W4A8 / W8A8 kernels.

    python -m kernels.bench [--quick] [--out results/bench/<file>.json] [--plot <file>.png]
    python -m kernels.bench --allow-cpu     # tiny smoke run without a GPU (perf_counter)

On a GPU: LLaMA-2 7B/13B/70B linear shapes (N x K) at M = 1 .. 4096 tokens for
  fp16        torch.nn.functional.linear (cuBLAS)
  w4a8        Triton W4A8 GEMM, activations already quantized (gemm only)
  w4a8+quant  the same including the fused per-token activation quantization
  w8a8        Triton W8A8 GEMM (gemm only) and w8a8+quant
  w8a8_int_mm torch._int_mm (cuBLASLt int8) + torch epilogue (gemm only)
with speedups vs fp16, achieved bandwidth (GB/s) and int8 TOPS vs the device peak, plus an
end-to-end LLaMA-2-7B-shaped stack of linears (decode M = 1, 16; prefill M = 2048).
Timings: triton.testing.do_bench (median, ms). Needs torch + triton only.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import reference as ref

SHAPES = {  # model -> [(N, K)] of its linears (q/k/v/o share N = K = hidden)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama2-13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "llama2-70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
MS = [1, 4, 16, 64, 256, 1024, 4096]
QUICK_MS = [1, 16, 256, 4096]
GROUP_SIZE = 128
# dense peaks (no sparsity): HBM GB/s, int8 TOPS, fp16 TFLOPS
PEAKS = {
    "H200": {"hbm_gbs": 4800.0, "int8_tops": 1979.0, "fp16_tflops": 989.0},
    "H100 PCIe": {"hbm_gbs": 2000.0, "int8_tops": 1513.0, "fp16_tflops": 756.0},
    "H100 NVL": {"hbm_gbs": 3900.0, "int8_tops": 1671.0, "fp16_tflops": 835.0},
    "H100": {"hbm_gbs": 3350.0, "int8_tops": 1979.0, "fp16_tflops": 989.0},  # SXM
}
E2E_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000, "decode_ctx": 512}

Timer = Callable[[Callable[[], object]], float]


# ---------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------


def device_peaks(name: str) -> dict | None:
    """Peak numbers from the device name (H100 SXM / PCIe / NVL, H200); None if unknown."""
    for key in ("H200", "H100 PCIe", "H100 NVL", "H100"):
        if all(part in name for part in key.split()):
            return {"model": key, **PEAKS[key]}
    return None


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "hostname": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=_driver_version(),
            peaks=device_peaks(props.name),
        )
    else:
        info.update(device="cpu", peaks=None)
    return info


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------


def gpu_timer(quick: bool) -> Timer:
    """CUDA-graph replay (median ms per call): what a serving stack that captures its decode
    step sees; launch overhead of the Python wrappers is excluded for every variant alike.
    Callers rotate through weight copies larger than L2 so replays stream from HBM."""
    import triton.testing

    rep = 20 if quick else 40

    def timer(fn):
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))

    return timer


def eager_timer(quick: bool) -> Timer:
    """Eager launches with an L2 flush before each call (triton do_bench, median ms):
    includes each wrapper's Python / launch overhead."""
    import triton.testing

    rep = 20 if quick else 40

    def timer(fn):
        return float(triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median"))

    return timer


def cpu_timer(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------
# GEMM variants
# ---------------------------------------------------------------------------------------


class Impl:
    """Kernel entry points: Triton on CUDA (or under the interpreter), else references."""

    def __init__(self, use_triton: bool):
        self.use_triton = use_triton
        if use_triton:
            from kernels.quant_per_token import quant_per_token
            from kernels.w4a8_gemm import w4a8_gemm
            from kernels.w8a8_gemm import w8a8_gemm, w8a8_gemm_torch

            self.quant, self.w4a8, self.w8a8 = quant_per_token, w4a8_gemm, w8a8_gemm
            self.int_mm = w8a8_gemm_torch
        else:
            self.quant, self.w4a8, self.w8a8 = (
                ref.quant_per_token_ref, ref.w4a8_gemm_ref, ref.w8a8_gemm_ref,
            )  # fmt: skip
            self.int_mm = None


L2_ROTATE_BYTES = 256 * 2**20  # weight copies cycled per call: > 4x the 50-60 MB L2 of H100/H200
MAX_COPIES = 32


class Rotation:
    """Cycles through equally shaped weight copies: consecutive (graph-captured) calls read
    different memory, so a weight smaller than L2 is not served from L2 in a timing loop."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def __call__(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def n_copies(n: int, k: int, device: str) -> int:
    """Copies so the smallest form (packed int4) of one weight set spans L2_ROTATE_BYTES."""
    if device != "cuda":
        return 1
    return max(1, min(MAX_COPIES, math.ceil(L2_ROTATE_BYTES / (n * k / 2))))


def make_problem(m: int, n: int, k: int, device: str, seed: int = 0, copies: int = 1) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g).half()

    def weights():
        return {
            "w16": (torch.randn(n, k, device=device, generator=g) * 0.02).half(),
            "w4": torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8, generator=g),
            "w4_scale": (torch.rand(n, k // GROUP_SIZE, device=device, generator=g) * 0.01).half(),
            "w8": torch.randint(-128, 128, (n, k), device=device, dtype=torch.int8, generator=g),
            "w8_scale": torch.rand(n, device=device, generator=g) * 0.01,
        }

    sets = [weights() for _ in range(copies)]
    return {"x": x, **sets[0], "copies": sets}


def gemm_variants(p: dict, impl: Impl) -> dict[str, Callable[[], object]]:
    x = p["x"]
    xq, xs = impl.quant(x)
    copies = p["copies"]
    w16 = Rotation([c["w16"] for c in copies])
    w4 = Rotation([(c["w4"], c["w4_scale"]) for c in copies])
    w8 = Rotation([(c["w8"], c["w8_scale"]) for c in copies])
    v = {
        "fp16": lambda: F.linear(x, w16()),
        "w4a8": lambda: impl.w4a8(xq, xs, *w4(), GROUP_SIZE),
        "w4a8+quant": lambda: impl.w4a8(*impl.quant(x), *w4(), GROUP_SIZE),
        "w8a8": lambda: impl.w8a8(xq, xs, *w8()),
        "w8a8+quant": lambda: impl.w8a8(*impl.quant(x), *w8()),
        "quant_only": lambda: impl.quant(x),
    }
    if impl.int_mm is not None:
        v["w8a8_int_mm"] = lambda: impl.int_mm(xq, xs, *w8())
    return v


def traffic_bytes(name: str, m: int, n: int, k: int) -> float:
    """Minimum DRAM bytes: weights (+ scales) once, activations in, output out."""
    out = 2.0 * m * n
    if name == "fp16":
        return 2.0 * n * k + 2.0 * m * k + out
    if name == "quant_only":
        return 2.0 * m * k + m * k + 4.0 * m
    act = 2.0 * m * k if name.endswith("+quant") else 1.0 * m * k + 4.0 * m
    if name.startswith("w4a8"):
        return 0.5 * n * k + 2.0 * n * (k // GROUP_SIZE) + act + out
    return 1.0 * n * k + 4.0 * n + act + out


def check_correctness(p: dict, impl: Impl) -> dict:
    """Max relative error of the kernels vs the exact references at this problem size."""
    x = p["x"]
    xq, xs = impl.quant(x)
    xq_r, xs_r = ref.quant_per_token_ref(x)
    res = {"quant_exact": bool(torch.equal(xq, xq_r) and torch.equal(xs, xs_r))}
    pairs = {
        "w4a8": (impl.w4a8(xq, xs, p["w4"], p["w4_scale"], GROUP_SIZE),  # w4: kernel layout
                 ref.w4a8_gemm_ref(xq, xs, ref.from_kernel_layout(p["w4"], GROUP_SIZE), p["w4_scale"], GROUP_SIZE)),
        "w8a8": (impl.w8a8(xq, xs, p["w8"], p["w8_scale"]),
                 ref.w8a8_gemm_ref(xq, xs, p["w8"], p["w8_scale"])),
    }  # fmt: skip
    for name, (y, r) in pairs.items():
        err = (y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)
        res[f"{name}_max_rel_err"] = float(err)
    return res


EAGER_VARIANTS = ("fp16", "w4a8+quant")


def bench_gemms(shapes: dict, ms: list[int], device: str, timer: Timer, impl: Impl, peaks,
                eager: Timer | None = None, deadline: float | None = None,
                on_shape: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One row per (shape, M): timings of every variant (graph replay on a GPU), eager
    timings of EAGER_VARIANTS, a correctness check at the smallest M and M = 16.
    Stops before a new shape once time.time() passes deadline (the rows so far are kept)."""
    rows = []
    for model, nks in shapes.items():
        for n, k in nks:
            if deadline is not None and time.time() > deadline:
                print(f"time budget reached: skipping {model} {n}x{k} and later shapes", flush=True)
                return rows
            for m in ms:
                p = make_problem(m, n, k, device, copies=n_copies(n, k, device))
                row = {"model": model, "N": n, "K": k, "M": m, "copies": len(p["copies"]),
                       "ms": {}, "ms_eager": {}, "errors": {}}  # fmt: skip
                if m == min(ms) or m == 16:
                    try:
                        row["check"] = check_correctness(p, impl)
                    except Exception as e:  # keep benchmarking; record why
                        row["errors"]["check"] = repr(e)[:300]
                for name, fn in gemm_variants(p, impl).items():
                    try:
                        row["ms"][name] = timer(fn)
                        if eager is not None and name in EAGER_VARIANTS:
                            row["ms_eager"][name] = eager(fn)
                    except Exception as e:
                        row["errors"][name] = repr(e)[:300]
                add_metrics(row, peaks)
                rows.append(row)
                print(_row_line(row), flush=True)
                del p
            if device == "cuda":
                torch.cuda.empty_cache()
            if on_shape is not None:
                on_shape(rows)
    return rows


def add_metrics(row: dict, peaks: dict | None) -> None:
    m, n, k = row["M"], row["N"], row["K"]
    base = row["ms"].get("fp16")
    row["speedup_vs_fp16"], row["gbs"], row["tops"] = {}, {}, {}
    row["pct_peak_bw"], row["pct_peak_int8"] = {}, {}
    for name, t in row["ms"].items():
        sec = t * 1e-3
        if base and name != "quant_only":
            row["speedup_vs_fp16"][name] = base / t
        row["gbs"][name] = traffic_bytes(name, m, n, k) / sec / 1e9
        if name != "quant_only":
            row["tops"][name] = 2.0 * m * n * k / sec / 1e12
        if peaks:
            row["pct_peak_bw"][name] = 100.0 * row["gbs"][name] / peaks["hbm_gbs"]
            if name.startswith("w") and name in row["tops"]:
                row["pct_peak_int8"][name] = 100.0 * row["tops"][name] / peaks["int8_tops"]
    eager = row.get("ms_eager", {})
    if "fp16" in eager:
        row["speedup_eager_vs_fp16"] = {n: eager["fp16"] / t for n, t in eager.items() if n != "fp16"}


def _row_line(row: dict) -> str:
    t = " ".join(f"{k}={v * 1e3:.1f}us" for k, v in row["ms"].items())
    return f"[{row['model']} N={row['N']} K={row['K']} M={row['M']}] {t}"


# ---------------------------------------------------------------------------------------
# end-to-end stack of linears (LLaMA-2-7B shapes, random weights)
# ---------------------------------------------------------------------------------------


class Decoder:
    """LLaMA-shaped decoder with random weights: per layer RMSNorm, fused q/k/v linear,
    rotary embedding, SDPA attention over a preallocated KV cache, o linear, RMSNorm, fused
    gate/up linear, SiLU-gate, down linear, residuals; final RMSNorm + fp16 lm_head on the
    last position. `linear` is fp16 (F.linear) or W4A8 (kernels.ops.w4a8_linear: per-token
    int8 activation quantization + W4A8 GEMM, the runtime modules' path). q/k/v and gate/up
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
            return (torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8, generator=g),
                    (torch.rand(n, k // GROUP_SIZE, device=device, generator=g) * 2e-3).half())  # fmt: skip

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

        return ops.w4a8_linear(x, w[0], w[1], GROUP_SIZE, backend="auto" if x.is_cuda else "reference")

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


def bench_e2e(device: str, timer: Timer, impl: Impl, layers: int, dims: dict,
              decode_batches: list[int], decode_ctx: int, prefill_len: int,
              eager: Timer | None = None) -> dict:
    """Decode step (batch b, one new token after decode_ctx cached ones) and prefill
    (batch 1, prefill_len tokens) of a LLaMA-shaped decoder, fp16 vs W4A8 (+ activation quant).
    tokens/s = b / decode-step time."""
    res = {"layers": layers, **dims, "decode_ctx": decode_ctx, "prefill_len": prefill_len,
           "model": "Decoder (fused qkv / gate_up, SDPA, RoPE, RMSNorm; fp16 lm_head)",
           "ms": {}, "speedup": {}, "tok_s": {}, "weight_gb": {}, "ms_eager": {}}  # fmt: skip
    max_ctx = max(decode_ctx + 1, prefill_len)
    g = torch.Generator(device=device).manual_seed(1)
    cases = [(f"decode_b{b}", b, 1, decode_ctx) for b in decode_batches] + [(f"prefill_{prefill_len}", 1, prefill_len, 0)]
    for quant in ("fp16", "w4a8+quant"):
        model = Decoder(dims, layers, "fp16" if quant == "fp16" else "w4a8", device,
                        max(decode_batches), max_ctx, impl)  # fmt: skip
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
        if name.startswith("decode"):
            res["tok_s"][name] = {q: b / (ms * 1e-3) for q, ms in res["ms"][name].items()}
        line = f"[e2e {layers} layers {name}] fp16={t16:.3f}ms w4a8+quant={t4:.3f}ms speedup={t16 / t4:.2f}x"
        if name in res["ms_eager"]:
            e = res["ms_eager"][name]
            line += f" | eager fp16={e['fp16']:.3f}ms w4a8+quant={e['w4a8+quant']:.3f}ms"
        print(line, flush=True)
    return res


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------

TABLE_COLS = ["fp16", "w4a8", "w4a8+quant", "w8a8", "w8a8+quant", "w8a8_int_mm"]


def markdown_table(rows: list[dict], peaks: dict | None) -> str:
    head = ["model", "N x K", "M"] + [f"{c} us (x)" for c in TABLE_COLS]
    head += ["w4a8 GB/s" + (" (%peak)" if peaks else ""), "w8a8 TOPS" + (" (%peak)" if peaks else "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['N']}x{r['K']}", str(r["M"])]
        for c in TABLE_COLS:
            t = r["ms"].get(c)
            sp = r["speedup_vs_fp16"].get(c)
            cells.append("-" if t is None else f"{t * 1e3:.1f}" + (f" ({sp:.2f}x)" if sp and c != "fp16" else ""))
        for name, key, pkey in (("w4a8", "gbs", "pct_peak_bw"), ("w8a8", "tops", "pct_peak_int8")):
            v = r[key].get(name)
            pct = r[pkey].get(name)
            cells.append("-" if v is None else f"{v:.0f}" + (f" ({pct:.0f}%)" if pct is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(result: dict, path: str | os.PathLike) -> bool:
    """Speedup-vs-M and roofline (TOPS vs arithmetic intensity) plots; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, peaks = result["gemm"], result["env"].get("peaks")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for n, k in sorted({(r["N"], r["K"]) for r in rows}):
        sel = [r for r in rows if (r["N"], r["K"]) == (n, k) and "w4a8+quant" in r["speedup_vs_fp16"]]
        if sel:
            ax1.plot([r["M"] for r in sel], [r["speedup_vs_fp16"]["w4a8+quant"] for r in sel],
                     marker="o", label=f"{n}x{k}")  # fmt: skip
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xscale="log", xlabel="M (tokens)", ylabel="speedup vs fp16",
            title="W4A8 (incl. activation quant) vs cuBLAS fp16")  # fmt: skip
    ax1.legend(fontsize=7)
    for name, marker in (("fp16", "s"), ("w4a8", "o"), ("w8a8", "^"), ("w8a8_int_mm", "x")):
        pts = [(2.0 * r["M"] * r["N"] * r["K"] / traffic_bytes(name, r["M"], r["N"], r["K"]), r["tops"][name])
               for r in rows if name in r["tops"]]  # fmt: skip
        if pts:
            ax2.scatter(*zip(*pts, strict=True), marker=marker, label=name, s=14)
    if peaks:
        ai = [10 ** (i / 10) for i in range(0, 50)]
        for lim, style in ((peaks["int8_tops"], "--"), (peaks["fp16_tflops"], ":")):
            ax2.plot(ai, [min(lim, a * peaks["hbm_gbs"] / 1e3) for a in ai], style, color="k", lw=0.8)
    ax2.set(xscale="log", yscale="log", xlabel="ops / DRAM byte", ylabel="T(FL)OPS",
            title=f"roofline: {result['env'].get('device')}")  # fmt: skip
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_json(result: dict, out: str | None) -> None:
    if not out:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out}")


def _summary(rows: list[dict]) -> dict:
    """Geometric-mean speedup vs fp16 per variant, split decode (M <= 16) / prefill."""
    out = {}
    for regime, pred in (("decode_M<=16", lambda m: m <= 16), ("prefill_M>=256", lambda m: m >= 256)):
        for name in TABLE_COLS[1:]:
            vals = [r["speedup_vs_fp16"][name] for r in rows if pred(r["M"]) and name in r["speedup_vs_fp16"]]
            if vals:
                out[f"{regime}/{name}"] = math.exp(sum(map(math.log, vals)) / len(vals))
    return out


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="7B shapes, M in 1/16/256/4096, 8-layer e2e")
    ap.add_argument("--out", help="JSON path (e.g. results/bench/h100.json)")
    ap.add_argument("--plot", help="PNG path for the speedup/roofline plot (needs matplotlib)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end stack")
    ap.add_argument("--allow-cpu", action="store_true", help="without a GPU: tiny smoke run")
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), help="GEMM shape sets (default: all)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="start no new GEMM shape after this many minutes (results so far are kept)")
    args = ap.parse_args(argv)

    env = environment()
    if not torch.cuda.is_available():
        if not args.allow_cpu:
            print("kernels.bench: benchmarks need a CUDA GPU (none found); nothing measured. "
                  "Use --allow-cpu for a tiny smoke run of the code paths.")  # fmt: skip
            return 0
        return _cpu_smoke(args, env)

    import kernels._triton_common  # noqa: F401  (fails loudly here if triton is broken)

    timer, eager = gpu_timer(args.quick), eager_timer(args.quick)
    impl = Impl(use_triton=True)
    models = args.models or (["llama2-7b"] if args.quick else list(SHAPES))
    shapes = {name: SHAPES[name] for name in models}
    ms = QUICK_MS if args.quick else MS
    print(f"device: {env['device']}  driver: {env.get('driver')}  torch {env['torch']}  "
          f"triton {env['triton']}  peaks: {env['peaks'] or 'unknown'}", flush=True)  # fmt: skip
    t0 = time.time()
    deadline = t0 + 60 * args.budget_min if args.budget_min else None
    result = {"env": env, "config": {"group_size": GROUP_SIZE, "quick": args.quick, "ms": ms,
                                     "timer": "CUDA-graph replay median (do_bench_cudagraph); "
                                              "ms_eager: do_bench median with L2 flush",
                                     "l2_rotate_bytes": L2_ROTATE_BYTES},
              "gemm": []}  # fmt: skip

    def save(rows: list[dict]) -> None:
        result["gemm"], result["summary"] = rows, _summary(rows)
        result["wall_s"] = time.time() - t0
        write_json(result, args.out)

    # 7B shapes first, then the end-to-end decoder, then the larger shapes within the budget
    first, rest = dict(list(shapes.items())[:1]), dict(list(shapes.items())[1:])
    rows = bench_gemms(first, ms, "cuda", timer, impl, env["peaks"], eager)
    save(rows)
    if not args.no_e2e:
        layers = 8 if args.quick else E2E_7B["layers"]
        dims = {k: E2E_7B[k] for k in ("hidden", "intermediate", "vocab")}
        try:
            result["e2e_llama2_7b"] = bench_e2e("cuda", timer, impl, layers, dims, [1, 16],
                                                E2E_7B["decode_ctx"], 2048, eager)  # fmt: skip
        except Exception as e:
            result["e2e_llama2_7b"] = {"error": repr(e)[:500]}
            print(f"e2e failed: {e!r}", flush=True)
        save(rows)
    rows = rows + bench_gemms(rest, ms, "cuda", timer, impl, env["peaks"], eager, deadline,
                              on_shape=lambda new: save(rows + new))  # fmt: skip
    save(rows)
    print()
    print(markdown_table(rows, env["peaks"]))
    print()
    print(json.dumps(result["summary"], indent=1))
    if args.plot and not plot_results(result, args.plot):
        print("matplotlib not importable: no plot written")
    return 0


def _cpu_smoke(args, env: dict) -> int:
    """Tiny shapes, perf_counter; Triton under TRITON_INTERPRET=1 if set, else references."""
    use_triton = False
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from kernels._triton_common import INTERPRETED

            use_triton = INTERPRETED
        except ImportError:
            pass
    impl = Impl(use_triton)
    print(f"CPU smoke run ({'Triton interpreter' if use_triton else 'PyTorch references'}); "
          "timings are not meaningful", flush=True)  # fmt: skip
    shapes = {"tiny": [(256, 256), (384, 256)]}
    rows = bench_gemms(shapes, [1, 16, 80], "cpu", cpu_timer, impl, None)
    result = {"env": env, "config": {"group_size": GROUP_SIZE, "smoke": True}, "gemm": rows,
              "summary": _summary(rows)}  # fmt: skip
    if not args.no_e2e:
        dims = {"hidden": 256, "intermediate": 512, "vocab": 512}
        result["e2e_smoke"] = bench_e2e("cpu", cpu_timer, impl, 2, dims, [1, 4], 16, 32)
    print(markdown_table(rows, None))
    write_json(result, args.out)
    if args.plot and not plot_results(result, args.plot):
        print("matplotlib not importable: no plot written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
