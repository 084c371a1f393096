"""GEMM and end-to-end latency benchmark: fp16 cuBLAS vs W4A8 / W8A8 kernels.

    python -m kernels.bench [--quick] [--out results/bench/<file>.json] [--plot <file>.png]
    python -m kernels.bench --allow-cpu     # tiny smoke run without a GPU (perf_counter)

On a GPU: LLaMA-2 7B/13B/70B, LLaMA-3-8B and Qwen2.5-7B linear shapes (N x K) at M = 1 .. 4096
tokens for
  fp16        torch.nn.functional.linear (cuBLAS)
  w4a8        Triton W4A8 GEMM, activations already quantized (gemm only)
  w4a8+quant  the same including the fused per-token activation quantization
  w8a8        Triton W8A8 GEMM (gemm only) and w8a8+quant
  w4a8_2l     W4A8 with two-level weight scales (int8 GEMM over K) (+quant)
  w8a8_int_mm torch._int_mm (cuBLASLt int8) + torch epilogue (gemm only)
and a comparison with gemlite / torchao kernels where importable (skipped with the reason).
with speedups vs fp16, achieved bandwidth (GB/s) and int8 TOPS vs the device peak, plus an
end-to-end LLaMA-2-7B-shaped stack of linears (decode M = 1, 16; prefill M = 2048).
Timings: CUDA-graph replay medians (kernels.bench.timing). Needs torch + triton only.
Modules: env (device, peaks), timing, gemm (shapes, variants, metrics), decoder (end-to-end),
report (table, plot, JSON); this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from kernels.bench.decoder import E2E_7B, bench_e2e
from kernels.bench.env import environment
from kernels.bench.gemm import GROUP_SIZE, MS, QUICK_MS, SHAPES, Impl, bench_gemms
from kernels.bench.report import markdown_table, plot_results, summary, write_json
from kernels.bench.timing import L2_ROTATE_BYTES, cpu_timer, eager_timer, gpu_timer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="7B shapes, M in 1/16/256/4096, 8-layer e2e")
    ap.add_argument("--out", help="JSON path (e.g. results/bench/h100.json)")
    ap.add_argument("--plot", help="PNG path for the speedup/roofline plot (needs matplotlib)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end stack")
    ap.add_argument("--allow-cpu", action="store_true", help="without a GPU: tiny smoke run")
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), help="GEMM shape sets (default: all)")
    ap.add_argument("--no-libraries", action="store_true",
                    help="skip the comparison with gemlite / torchao (when importable)")
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
        result["gemm"], result["summary"] = rows, summary(rows)
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
    if not args.no_libraries:  # other libraries at the 7B shapes, decode and prefill
        from kernels.bench.libraries import bench_libraries, library_table

        result["libraries"] = bench_libraries(SHAPES["llama2-7b"], QUICK_MS, timer)
        print(library_table(result["libraries"]), flush=True)
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
              "summary": summary(rows)}  # fmt: skip
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
