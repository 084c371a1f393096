"""Cost of native GPTQ vs llm-compressor's GPTQModifier at the same settings.

    python benchmarks/gptq_cost.py --model smollm2-135m --n-samples 16 --seqlen 512 \
        --out results/bench/gptq_cost.json

Both run on a fresh copy of the same loaded model with the same calibration token tensors
(w4a16, group 64 for SmolLM2, act_order, damp 0.01, block 128); wall time and peak process
RSS (CPU) or peak CUDA memory are measured per run and the ratio library / native printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", default="w4a16")
    ap.add_argument("--out", default="results/bench/gptq_cost.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from hydra import compose, initialize_config_dir

    from harness.calib import CalibSpec, load_calibration
    from harness.data import resolve_data_dir
    from harness.models import load_model
    from methods.base import build
    from methods.baselines import LLMCompressorGPTQConfig
    from methods.gptq import GPTQConfig

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("run", overrides=[f"model={args.model}", f"bits={args.bits}"])
    data_dir = resolve_data_dir(cfg.paths.get("data_dir"))
    lm = load_model(cfg.model, Path(cfg.paths.cache_dir))
    calib, _ = load_calibration(lm.tokenizer, CalibSpec("c4", args.n_samples, args.seqlen, 0),
                                data_dir, Path(cfg.paths.cache_dir), False,
                                lm.model.config.vocab_size)
    settings = dict(w_bits=int(cfg.bits.w_bits), a_bits=int(cfg.bits.a_bits),
                    group_size=int(cfg.bits.group_size), symmetric=True, damp=0.01,
                    block_size=128, act_order=True)
    runs = {}
    for label, config in [("native", GPTQConfig(**settings)),
                          ("llmcompressor", LLMCompressorGPTQConfig(**settings))]:
        model = copy.deepcopy(lm.model)
        method = build(config)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rss0 = _peak_rss_mb()
        t0 = time.perf_counter()
        method.quantize(model, lm.spec, calib)
        seconds = time.perf_counter() - t0
        runs[label] = {"seconds": round(seconds, 2),
                       "peak_rss_mb_after": round(_peak_rss_mb(), 1),
                       "peak_rss_growth_mb": round(_peak_rss_mb() - rss0, 1),
                       "peak_cuda_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                        if torch.cuda.is_available() else None)}
        del model, method
    result = {"model": args.model, "calibration": f"c4 {args.n_samples}x{args.seqlen}",
              "settings": settings, "runs": runs,
              "time_ratio_llmcompressor_over_native":
                  round(runs["llmcompressor"]["seconds"] / runs["native"]["seconds"], 3),
              "host": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "device": "cuda" if torch.cuda.is_available() else "cpu",
                       "platform": platform.platform(), "torch": torch.__version__},
              "note": "peak RSS is process-wide and monotone: the second run's growth "
                      "understates its own peak; compare CUDA peaks where available"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
