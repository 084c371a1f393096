#!/usr/bin/env bash
# The committed SmolLM2-135M evidence (results/runs -> reports/smollm2-135m). Resumable: finished
# configs are skipped on a rerun. About an hour on 2 CPU cores.
set -uo pipefail
cd "$(dirname "$0")/.."
PTQ="${PTQ:-.venv/bin/ptqbench}"
BUDGET=(model=smollm2-135m calib=c4-32x512 eval=ppl-capped)
# fp16 PTB perplexity over all windows at seqlen 2048 (the reference figure)
$PTQ model=smollm2-135m method=fp16 bits=w16a16 eval=ppl 'eval.datasets=[ptb]'
# every method at w16a16 / w8a8 / w4a16 / w4a8 (unsupported pairs are recorded as skipped)
$PTQ -m experiment=smollm2_main
# rtn w4a8 with dynamic per-token activations
$PTQ "${BUDGET[@]}" method=rtn bits=w4a8 method.act_mode=dynamic_token
# FPTQ ablations: all-static / all-dynamic; SmoothQuant in the middle bucket; GPTQ weights
ABL=(-m experiment=fptq_ablation calib=c4-32x512 eval=ppl-capped method.v0=15 method.v1=150)
$PTQ "${ABL[@]}" method.policy=all_static,all_dynamic method.middle=lae method.weight_method=rtn
$PTQ "${ABL[@]}" method.policy=layerwise method.middle=smoothquant method.weight_method=rtn
$PTQ "${ABL[@]}" method.policy=layerwise method.middle=lae method.weight_method=gptq
