#!/usr/bin/env bash
# Short device session: 7B-shape benchmark + end-to-end decoder, GPU tests, stage ablation.
set -uo pipefail
OUT=${OUT:-results/bench/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${GPU_SITE:+:$GPU_SITE}"
python3 -m kernels.bench --models llama2-7b --out "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log" | grep -v "^|"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu $XDIST tests/test_kernels.py tests/test_runtime.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -4
python3 -m kernels.ablate --ms 1 16 4096 --out "$OUT/ablate.json" 2>&1 | tee "$OUT/ablate.log"
