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
E2E_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008}

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
    import triton.testing

    rep = 40 if quick else 100

    def timer(fn):
        return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))

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


def make_problem(m: int, n: int, k: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g).half()
    w = (torch.randn(n, k, device=device, generator=g) * 0.02).half()
    return {
        "x": x,
        "w16": w,
        "w4": torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8, generator=g),
        "w4_scale": (torch.rand(n, k // GROUP_SIZE, device=device, generator=g) * 0.01).half(),
        "w8": torch.randint(-128, 128, (n, k), device=device, dtype=torch.int8, generator=g),
        "w8_scale": torch.rand(n, device=device, generator=g) * 0.01,
    }


def gemm_variants(p: dict, impl: Impl) -> dict[str, Callable[[], object]]:
    x = p["x"]
    xq, xs = impl.quant(x)
    w4, s4, w8, s8 = p["w4"], p["w4_scale"], p["w8"], p["w8_scale"]
    v = {
        "fp16": lambda: F.linear(x, p["w16"]),
        "w4a8": lambda: impl.w4a8(xq, xs, w4, s4, GROUP_SIZE),
        "w4a8+quant": lambda: impl.w4a8(*impl.quant(x), w4, s4, GROUP_SIZE),
        "w8a8": lambda: impl.w8a8(xq, xs, w8, s8),
        "w8a8+quant": lambda: impl.w8a8(*impl.quant(x), w8, s8),
        "quant_only": lambda: impl.quant(x),
    }
    if impl.int_mm is not None:
        v["w8a8_int_mm"] = lambda: impl.int_mm(xq, xs, w8, s8)
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
        "w4a8": (impl.w4a8(xq, xs, p["w4"], p["w4_scale"], GROUP_SIZE),
                 ref.w4a8_gemm_ref(xq, xs, p["w4"], p["w4_scale"], GROUP_SIZE)),
        "w8a8": (impl.w8a8(xq, xs, p["w8"], p["w8_scale"]),
                 ref.w8a8_gemm_ref(xq, xs, p["w8"], p["w8_scale"])),
    }  # fmt: skip
    for name, (y, r) in pairs.items():
        err = (y.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-12)
        res[f"{name}_max_rel_err"] = float(err)
    return res


def bench_gemms(shapes: dict, ms: list[int], device: str, timer: Timer, impl: Impl, peaks) -> list[dict]:
    rows = []
    for model, nks in shapes.items():
        for n, k in nks:
            for m in ms:
                p = make_problem(m, n, k, device)
                row = {"model": model, "N": n, "K": k, "M": m, "ms": {}, "errors": {}}
                if m == min(ms) or m == 16:
                    try:
                        row["check"] = check_correctness(p, impl)
                    except Exception as e:  # keep benchmarking; record why
                        row["errors"]["check"] = repr(e)[:300]
                for name, fn in gemm_variants(p, impl).items():
                    try:
                        row["ms"][name] = timer(fn)
                    except Exception as e:
                        row["errors"][name] = repr(e)[:300]
                add_metrics(row, peaks)
                rows.append(row)
                print(_row_line(row), flush=True)
                del p
            if device == "cuda":
                torch.cuda.empty_cache()
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


def _row_line(row: dict) -> str:
    t = " ".join(f"{k}={v * 1e3:.1f}us" for k, v in row["ms"].items())
    return f"[{row['model']} N={row['N']} K={row['K']} M={row['M']}] {t}"


# ---------------------------------------------------------------------------------------
# end-to-end stack of linears (LLaMA-2-7B shapes, random weights)
# ---------------------------------------------------------------------------------------


def _stack_shapes(hidden: int, inter: int) -> list[tuple[str, int, int]]:
    h, i = hidden, inter
    return [("q", h, h), ("k", h, h), ("v", h, h), ("o", h, h), ("gate", i, h), ("up", i, h), ("down", h, i)]


def bench_e2e(device: str, timer: Timer, impl: Impl, layers: int, ms: list[int], dims: dict) -> dict:
    """Per layer: q, k, v, o, gate, up, down linears (the non-linear parts are left out).
    The W4A8 path quantizes each linear's input separately (as unfused runtime modules do)."""
    shapes = _stack_shapes(dims["hidden"], dims["intermediate"])
    g = torch.Generator(device=device).manual_seed(0)
    w16 = [[(torch.randn(n, k, device=device, generator=g) * 0.02).half() for _, n, k in shapes]
           for _ in range(layers)]  # fmt: skip
    w4 = [[(torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8, generator=g),
            (torch.rand(n, k // GROUP_SIZE, device=device, generator=g) * 0.01).half())
           for _, n, k in shapes] for _ in range(layers)]  # fmt: skip

    def layer_inputs(x, outs):  # q/k/v/gate/up read the residual stream, o reads v, down reads up
        return {"q": x, "k": x, "v": x, "o": outs.get("v"), "gate": x, "up": x, "down": outs.get("up")}

    def run(linear, weights, x):
        for lw in weights:
            outs = {}
            for (name, _, _), w in zip(shapes, lw, strict=True):
                outs[name] = linear(layer_inputs(x, outs)[name], w)
            x = outs["down"]
        return x

    def fp16_linear(x, w):
        return F.linear(x, w)

    def w4a8_linear(x, w):
        return impl.w4a8(*impl.quant(x), w[0], w[1], GROUP_SIZE)

    res = {"layers": layers, **dims, "linears_per_layer": [s[0] for s in shapes], "ms": {}, "speedup": {}}
    for m in ms:
        x = torch.randn(m, dims["hidden"], device=device, generator=g).half()
        t16 = timer(lambda x=x: run(fp16_linear, w16, x))
        t4 = timer(lambda x=x: run(w4a8_linear, w4, x))
        res["ms"][str(m)] = {"fp16": t16, "w4a8+quant": t4}
        res["speedup"][str(m)] = t16 / t4
        print(f"[e2e {layers} layers M={m}] fp16={t16:.3f}ms w4a8+quant={t4:.3f}ms "
              f"speedup={t16 / t4:.2f}x", flush=True)  # fmt: skip
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
    args = ap.parse_args(argv)

    env = environment()
    if not torch.cuda.is_available():
        if not args.allow_cpu:
            print("kernels.bench: benchmarks need a CUDA GPU (none found); nothing measured. "
                  "Use --allow-cpu for a tiny smoke run of the code paths.")  # fmt: skip
            return 0
        return _cpu_smoke(args, env)

    import kernels._triton_common  # noqa: F401  (fails loudly here if triton is broken)

    timer = gpu_timer(args.quick)
    impl = Impl(use_triton=True)
    shapes = {"llama2-7b": SHAPES["llama2-7b"]} if args.quick else SHAPES
    ms = QUICK_MS if args.quick else MS
    print(f"device: {env['device']}  driver: {env.get('driver')}  torch {env['torch']}  "
          f"triton {env['triton']}  peaks: {env['peaks'] or 'unknown'}", flush=True)  # fmt: skip
    t0 = time.time()
    rows = bench_gemms(shapes, ms, "cuda", timer, impl, env["peaks"])
    result = {"env": env, "config": {"group_size": GROUP_SIZE, "quick": args.quick, "timer": "do_bench median"},
              "gemm": rows, "summary": _summary(rows)}  # fmt: skip
    if not args.no_e2e:
        layers = 8 if args.quick else E2E_7B["layers"]
        dims = {k: E2E_7B[k] for k in ("hidden", "intermediate")}
        try:
            result["e2e_llama2_7b"] = bench_e2e("cuda", timer, impl, layers, [1, 16, 2048], dims)
        except Exception as e:
            result["e2e_llama2_7b"] = {"error": repr(e)[:500]}
    result["wall_s"] = time.time() - t0
    print()
    print(markdown_table(rows, env["peaks"]))
    print()
    print(json.dumps(result["summary"], indent=1))
    write_json(result, args.out)
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
        dims = {"hidden": 256, "intermediate": 512}
        result["e2e_smoke"] = bench_e2e("cpu", cpu_timer, impl, 2, [1, 16], dims)
    print(markdown_table(rows, None))
    write_json(result, args.out)
    if args.plot and not plot_results(result, args.plot):
        print("matplotlib not importable: no plot written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
