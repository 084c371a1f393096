"""GEMM benchmark: fp16 cuBLAS vs W4A8 / W8A8 kernels over model linear shapes and M."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import reference as ref
from kernels.bench.timing import Rotation, Timer, n_copies

SHAPES = {  # model -> [(N, K)] of its linears (q/k/v/o share N = K = hidden)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama2-13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "llama2-70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    # grouped-query attention: k/v project to 8 (LLaMA-3) / 4 (Qwen2.5) heads of 128
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "qwen2.5-7b": [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)],
}
MS = [1, 4, 16, 64, 256, 1024, 4096]
QUICK_MS = [1, 16, 256, 4096]
GROUP_SIZE = 128


def _w4a8_ref_kernel_layout(xq, x_scale, w_kernel, w_scale, group_size, *args, **kw):
    """The reference with the kernel-layout weight every variant here holds."""
    w = ref.from_kernel_layout(w_kernel, group_size)
    return ref.w4a8_gemm_ref(xq, x_scale, w, w_scale, group_size, *args, **kw)


def _two_level_ref_kernel_layout(xq, x_scale, w_kernel, s1, s2, z, group_size, *args, **kw):
    w = ref.from_kernel_layout(w_kernel, group_size)
    return ref.w4a8_two_level_ref(xq, x_scale, w, s1, s2, z, group_size, *args, **kw)


class Impl:
    """Kernel entry points: Triton on CUDA (or under the interpreter), else references; the
    W4A8 weight is in the kernel layout for both."""

    def __init__(self, use_triton: bool):
        self.use_triton = use_triton
        if use_triton:
            from kernels.quant_per_token import quant_per_token
            from kernels.w4a8_gemm import w4a8_gemm, w4a8_two_level_gemm
            from kernels.w8a8_gemm import w8a8_gemm, w8a8_gemm_torch

            self.quant, self.w4a8, self.w8a8 = quant_per_token, w4a8_gemm, w8a8_gemm
            self.w4a8_2l = w4a8_two_level_gemm
            self.int_mm = w8a8_gemm_torch
        else:
            self.quant, self.w4a8, self.w8a8 = (
                ref.quant_per_token_ref, _w4a8_ref_kernel_layout, ref.w8a8_gemm_ref,
            )  # fmt: skip
            self.w4a8_2l = _two_level_ref_kernel_layout
            self.int_mm = None


def make_problem(m: int, n: int, k: int, device: str, seed: int = 0, copies: int = 1) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g).half()

    def weights():
        return {
            "w16": (torch.randn(n, k, device=device, generator=g) * 0.02).half(),
            "w4": torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8, generator=g),
            "w4_scale": (torch.rand(n, k // GROUP_SIZE, device=device, generator=g) * 0.01).half(),
            # two-level: per-channel fp16 scale, integer group scales s2 in [1, 15] (symmetric)
            "w4_s1": (torch.rand(n, device=device, generator=g) * 1e-3).half(),
            "w4_s2": torch.randint(1, 16, (n, k // GROUP_SIZE), device=device, dtype=torch.uint8, generator=g),
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
    w2l = Rotation([(c["w4"], c["w4_s1"], c["w4_s2"], None) for c in copies])
    v = {
        "fp16": lambda: F.linear(x, w16()),
        "w4a8": lambda: impl.w4a8(xq, xs, *w4(), GROUP_SIZE),
        "w4a8+quant": lambda: impl.w4a8(*impl.quant(x), *w4(), GROUP_SIZE),
        "w4a8_2l": lambda: impl.w4a8_2l(xq, xs, *w2l(), GROUP_SIZE),
        "w4a8_2l+quant": lambda: impl.w4a8_2l(*impl.quant(x), *w2l(), GROUP_SIZE),
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
    if name.startswith("w4a8_2l"):  # codes, uint8 group scales s2, fp16 channel scales
        return 0.5 * n * k + 1.0 * n * (k // GROUP_SIZE) + 2.0 * n + act + out
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
        "w4a8_2l": (impl.w4a8_2l(xq, xs, p["w4"], p["w4_s1"], p["w4_s2"], None, GROUP_SIZE),
                    ref.w4a8_two_level_ref(xq, xs, ref.from_kernel_layout(p["w4"], GROUP_SIZE),
                                           p["w4_s1"], p["w4_s2"], None, GROUP_SIZE)),
        "w8a8": (impl.w8a8(xq, xs, p["w8"], p["w8_scale"]),
                 ref.w8a8_gemm_ref(xq, xs, p["w8"], p["w8_scale"])),
    }  # fmt: skip
    for name, (y, r) in pairs.items():
        err = (y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)
        res[f"{name}_max_rel_err"] = float(err)
    return res


EAGER_VARIANTS = ("fp16", "w4a8+quant", "w4a8_2l+quant")


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

