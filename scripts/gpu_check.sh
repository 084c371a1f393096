#!/usr/bin/env bash
# One device session (< 10 minutes, every step capped by `timeout`): kernel + runtime tests on
# the GPU, the benchmark (two-level, LLaMA-3-8B / Qwen2.5-7B shapes, decoder, libraries), the
# W4A8 stage ablation (decode and prefill), and eval=latency (CUDA-graph decode) for fp16 and
# the fused W4A8 runtime model. Everything lands in results/bench/<device>/ (OUT overrides).
#   bash scripts/gpu_check.sh [extra bench args...]
# Needs torch + triton (+ pytest); hydra/omegaconf/transformers for the runtime tests and the
# latency eval (a folder of pure-Python packages can be put on PYTHONPATH as GPU_SITE).
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
      | sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
OUT=${OUT:-results/bench/${DEV:-gpu}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${GPU_SITE:+:$GPU_SITE}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - T0 ))s)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
step "kernel, two-level, fusion and runtime tests on the GPU"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu $XDIST tests/test_kernels.py \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
timeout 80 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_runtime.py \
  tests/test_two_level.py tests/test_fusion.py 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -10
step "benchmark"
timeout 220 python3 -m kernels.bench --quick --models llama2-7b llama3-8b qwen2.5-7b --budget-min 2 \
  --out "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 | tee "$OUT/bench.log" | tail -40
step "W4A8 stage ablation (decode and prefill)"
timeout 70 python3 -m kernels.ablate --ms 1 16 2048 --out "$OUT/ablate.json" 2>&1 | tee "$OUT/ablate.log"
step "eval=latency: CUDA-graph decode, fp16 vs fused W4A8 runtime (SmolLM2-135M)"
LAT=(model=smollm2-135m eval=latency "paths.results_dir=$OUT/latency" "eval.prompt_lens=[512]"
     "eval.batches=[1]" "eval.decode_batches=[1,16]" eval.decode_prompt_len=128 eval.new_tokens=64)
timeout 40 python3 -m harness.run.cli "${LAT[@]}" method=fp16 bits=w16a16 2>&1 | tail -3 | tee "$OUT/latency.log"
timeout 60 python3 -m harness.run.cli "${LAT[@]}" method=rtn bits=w4a8 runtime=true +runtime_fuse=true \
  +method.w_scales=two_level 2>&1 | tail -3 | tee -a "$OUT/latency.log"
step "done"
