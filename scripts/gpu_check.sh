#!/usr/bin/env bash
# One device session: kernel correctness on the GPU (pytest -m gpu), the benchmark, and the
# W4A8 stage ablation (results/bench/h200/ was made with these steps; v3 with --models llama2-7b).
#   OUT=<dir> bash scripts/gpu_check.sh [bench args...]
# Needs torch + triton (+ pytest, pytest-xdist); hydra/omegaconf only for the runtime tests
# (a folder of pure-Python packages can be put on PYTHONPATH as GPU_SITE).
set -uo pipefail
OUT=${OUT:-results/bench/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${GPU_SITE:+:$GPU_SITE}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
echo "== kernel tests on the GPU"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu $XDIST tests/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
echo "== runtime-module tests on the GPU"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_runtime.py 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -15
echo "== benchmark"
python3 -m kernels.bench --out "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 | tee "$OUT/bench.log"
echo "== W4A8 stage ablation"
python3 -m kernels.ablate --out "$OUT/ablate.json" 2>&1 | tee "$OUT/ablate.log"
