#!/usr/bin/env bash
# The real ptqbench pipeline on CUDA at LLaMA scale, in one device session (< 10 minutes,
# every step capped by `timeout`; methods in order of priority, as many as fit):
#   1. a LLaMA-2-7B-shaped random model built in code (hidden 4096, MLP 11008, 32 blocks, MHA;
#      byte-level vocab), bf16 on the GPU: fptq, gptq, rtn, smoothquant, awq at w4a8 with
#      32 x 2048 calibration tokens of C4, perplexity on 8 WikiText-2 windows of 2048;
#   2. latency of the runtime W4A8 model (CUDA-graph decode) against fp16;
#   3. one LLaMA-2-70B-shaped block (hidden 8192, MLP 28672, GQA 64/8) through the onloading
#      path (placement.mode=offload with a device budget below the model), gptq w4a16.
# A random model's perplexity means nothing; its seconds and peak GPU memory do. Records, logs
# and a table of seconds / peak memory per method and phase land in results/<device>/pipeline/.
#
#   bash scripts/gpu_pipeline_check.sh --prepare   # here (CPU): copy data + wheels to carry
#   bash scripts/gpu_pipeline_check.sh             # there: device `run` with carry [gpu_data, .whl]
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p gpu_data/c4 gpu_data/wikitext-2-raw .whl
  grep -qx "/gpu_data/" .git/info/exclude 2>/dev/null || echo "/gpu_data/" >> .git/info/exclude
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  cp -r ../shared/data/c4/. gpu_data/c4/ && cp -r ../shared/data/wikitext-2-raw/. gpu_data/wikitext-2-raw/
  for p in hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 tqdm; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 -d .whl "$p" || \
    python3 -m pip download -q --no-deps -d .whl "$p"
  done
  du -sh gpu_data .whl; exit 0
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
      | sed -e 's/nvidia//' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
OUT=${OUT:-results/${DEV:-gpu}/pipeline}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - T0 ))s)" | tee -a "$OUT/pipeline.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.txt"
L7=(model=tiny-llama model.name=llama-2-7b-random model.source.kwargs.hidden_size=4096
    model.source.kwargs.intermediate_size=11008 model.source.kwargs.num_layers=32
    model.source.kwargs.num_heads=32 model.source.kwargs.num_kv_heads=32
    model.dtype=bfloat16 model.device=cuda model.group_size=128
    calib=c4-128x2048 calib.n_samples=32 paths.data_dir=gpu_data "paths.results_dir=$OUT"
    cache=off sweep=gpu-pipeline)
PPL=(eval=ppl "eval.datasets=[wikitext2]" eval.max_windows=8 eval.seqlen=2048)
LIMITS=(fptq:150 gptq:150 rtn:45 smoothquant:60 awq:120)
for item in "${LIMITS[@]}"; do
  m=${item%%:*}; t=${item##*:}
  left=$(( 540 - ($(date +%s) - T0) ))
  (( left < 40 )) && { step "stop: $m and later skipped (budget)"; break; }
  step "7B-shaped: $m w4a8 (limit $(( t < left ? t : left ))s)"
  timeout $(( t < left ? t : left )) python3 -m harness.run.cli "${L7[@]}" "${PPL[@]}" \
    method=$m bits=w4a8 2>&1 | tail -4 | tee -a "$OUT/pipeline.log"
done
left=$(( 560 - ($(date +%s) - T0) ))
if (( left > 60 )); then
  step "7B-shaped latency: fp16 vs runtime W4A8 (CUDA-graph decode)"
  LAT=(eval=latency "eval.prompt_lens=[2048]" "eval.batches=[1]" "eval.decode_batches=[1,16]"
       eval.decode_prompt_len=128 eval.new_tokens=32)
  timeout 40 python3 -m harness.run.cli "${L7[@]}" "${LAT[@]}" method=fp16 bits=w16a16 2>&1 \
    | tail -3 | tee -a "$OUT/pipeline.log"
  timeout 50 python3 -m harness.run.cli "${L7[@]}" "${LAT[@]}" method=rtn bits=w4a8 runtime=true \
    2>&1 | tail -3 | tee -a "$OUT/pipeline.log"
fi
left=$(( 590 - ($(date +%s) - T0) ))
if (( left > 30 )); then
  step "one 70B-shaped block through the onloading path"
  timeout $left python3 -m harness.run.cli model=tiny-llama model.name=llama-2-70b-block \
    model.source.kwargs.hidden_size=8192 model.source.kwargs.intermediate_size=28672 \
    model.source.kwargs.num_layers=1 model.source.kwargs.num_heads=64 \
    model.source.kwargs.num_kv_heads=8 model.dtype=bfloat16 model.device=cuda \
    model.group_size=128 placement.mode=offload placement.device_memory_gb=2.5 \
    calib=c4-128x2048 calib.n_samples=8 paths.data_dir=gpu_data "paths.results_dir=$OUT" \
    cache=off eval=ppl "eval.datasets=[wikitext2]" eval.max_windows=2 eval.seqlen=2048 \
    method=gptq bits=w4a16 2>&1 | tail -4 | tee -a "$OUT/pipeline.log"
fi
step "table"
python3 - "$OUT" <<'PY' | tee "$OUT/README.md"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| model | method | bits | status | placement | phase: seconds (peak GPU MB) |\n|---|---|---|---|---|---|")
for p in sorted((out / "runs").glob("*.json")):
    r = json.loads(p.read_text())
    mem = r.get("memory", {})
    phases = ", ".join(f"{k} {v:.0f}s ({mem.get(f'peak_{k}_mb', 0):.0f})"
                       for k, v in r.get("timings", {}).items())
    pl = r.get("provenance", {}).get("model_info", {}).get("placement", {}).get("path", "")
    print(f"| {r['model']} | {r['method']} | {r['bits']} | {r['status']} | {pl} | {phases} |")
PY
step "done"
