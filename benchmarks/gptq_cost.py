"""Cost of native GPTQ vs llm-compressor's GPTQModifier at the same settings.

    python benchmarks/gptq_cost.py --model smollm2-135m --n-samples 32 --seqlen 512 \
        --out results/bench/gptq_cost_smollm2_cpu.json

Each variant runs in its own process (so peak memory is its own) on the same model and the
same calibration token tensors: w4a16, group from the model config (64 on SmolLM2),
asymmetric grid, act_order, damp 0.01, block 128. Native runs twice: per-layer sequential
(`true_sequential=false`, the library's granularity: like for like) and true-sequential (the
paper's default, more forward passes). Per run: wall time of `quantize`, and the peak
resident memory above the resident memory just before it (sampled every 20 ms), next to one
block's activation footprint for comparison. Ratios library / native are printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = ("native", "native_true_sequential", "llmcompressor")
REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak resident set size (MB) while the context runs, sampled by a thread."""

    def __init__(self, period_s: float = 0.02):
        self.period_s, self.peak, self._stop = period_s, 0.0, threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from harness.inputs.calib import CalibSpec, load_calibration
    from harness.inputs.data import resolve_data_dir
    from harness.inputs.models import load_model
    from harness.run.config_defaults import register_method_defaults
    from methods.catalog import build
    from methods.gptq import GPTQConfig

    register_method_defaults()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("run", overrides=[f"model={args.model}", f"bits={args.bits}"])
    lm = load_model(cfg.model, Path(cfg.paths.cache_dir))
    calib, _ = load_calibration(lm.tokenizer, CalibSpec("c4", args.n_samples, args.seqlen, 0),
                                resolve_data_dir(cfg.paths.get("data_dir")),
                                Path(cfg.paths.cache_dir), False, lm.model.config.vocab_size)
    settings = dict(w_bits=int(cfg.bits.w_bits), a_bits=int(cfg.bits.a_bits),
                    group_size=int(cfg.bits.group_size), symmetric=False, damp=0.01,
                    block_size=128, act_order=True)
    if args.variant == "llmcompressor":
        from methods.baselines import LLMCompressorGPTQConfig
        config = LLMCompressorGPTQConfig(**settings)
    else:
        config = GPTQConfig(**settings,
                            true_sequential=args.variant == "native_true_sequential")
    model = copy.deepcopy(lm.model)
    method = build(config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        before = mem.peak
        t0 = time.perf_counter()
        method.quantize(model, lm.spec, calib)
        seconds = time.perf_counter() - t0
    c = lm.model.config
    tokens = args.n_samples * args.seqlen
    # One block's activations: its input and output hidden states [n, L, d] plus the widest
    # intermediate [n, L, ffn] (fp32), the floor any block-wise calibration needs.
    block_mb = tokens * (2 * c.hidden_size + c.intermediate_size) * 4 / 2**20
    return {"seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
            "peak_rss_growth_mb": round(mem.peak - before, 1),
            "one_block_activations_mb": round(block_mb, 1),
            "model_fp32_mb": round(sum(p.numel() for p in lm.model.parameters()) * 4 / 2**20, 1),
            "peak_cuda_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                             if torch.cuda.is_available() else None),
            "settings": {**settings, "true_sequential": args.variant == "native_true_sequential"
                         if args.variant != "llmcompressor" else None},
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", default="w4a16")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default="results/bench/gptq_cost.json")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    runs = {}
    for v in args.variants:
        cmd = [sys.executable, __file__, "--variant", v, "--model", args.model,
               "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen),
               "--bits", args.bits]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            runs[v] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"{v}: failed (exit {proc.returncode})\n{runs[v]['error']}", file=sys.stderr)
            continue
        runs[v] = json.loads(lines[-1][len("RESULT "):])
        print(f"{v}: {runs[v]['seconds']} s, peak RSS +{runs[v]['peak_rss_growth_mb']} MB",
              flush=True)
    ratios = {}
    lib = runs.get("llmcompressor", {})
    for v in ("native", "native_true_sequential"):
        if "seconds" in runs.get(v, {}) and "seconds" in lib:
            ratios[f"time_llmcompressor_over_{v}"] = round(lib["seconds"] / runs[v]["seconds"], 3)
            ratios[f"mem_llmcompressor_over_{v}"] = round(
                lib["peak_rss_growth_mb"] / max(runs[v]["peak_rss_growth_mb"], 1e-9), 3)
    import torch
    result = {"model": args.model, "calibration": f"c4 {args.n_samples}x{args.seqlen}",
              "runs": runs, "ratios": ratios,
              "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "device": "cuda" if torch.cuda.is_available() else "cpu",
                       "loadavg": os.getloadavg()},
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
