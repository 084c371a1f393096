#!/usr/bin/env bash
# The committed SmolLM2-135M evidence (results/runs -> reports/smollm2-135m). Resumable: finished
# configs are skipped on a rerun. About 1.5 hours on 2 CPU cores (AWQ ~14 min per run).
set -uo pipefail
cd "$(dirname "$0")/.."
PTQ="${PTQ:-.venv/bin/ptqbench}"
BUDGET=(model=smollm2-135m calib=c4-32x512 eval=ppl-capped)
# fp16 PTB perplexity over all windows at seqlen 2048 (the reference figure)
$PTQ model=smollm2-135m method=fp16 bits=w16a16 eval=ppl 'eval.datasets=[ptb]'
# FPTQ and RTN with dynamic per-token activations (the RTN default) at w4a8 / w8a8
$PTQ "${BUDGET[@]}" method=fptq bits=w4a8
$PTQ -m "${BUDGET[@]}" method=rtn bits=w4a8,w8a8
# FPTQ ablations: all-static / all-dynamic; SmoothQuant in the middle bucket; GPTQ weights
ABL=(-m experiment=fptq_ablation calib=c4-32x512 eval=ppl-capped method.v0=15 method.v1=150)
$PTQ "${ABL[@]}" method.policy=all_static,all_dynamic method.middle=lae method.weight_method=rtn
$PTQ "${ABL[@]}" method.policy=layerwise method.middle=smoothquant method.weight_method=rtn
# RTN with static per-tensor activations (calibrated max |X|)
$PTQ -m "${BUDGET[@]}" method=rtn bits=w8a8,w4a8 method.act_mode=static_tensor
# every method at w16a16 / w8a8 / w4a16 / w4a8 (unsupported pairs are recorded as skipped)
$PTQ -m experiment=smollm2_main
$PTQ "${ABL[@]}" method.policy=layerwise method.middle=lae method.weight_method=gptq
