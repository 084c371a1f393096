#!/usr/bin/env bash
# The committed SmolLM2-135M evidence (results/runs -> reports/smollm2-135m). Resumable: finished
# configs are skipped on a rerun. About 3 hours on 2 CPU cores (AWQ ~14 min per run).
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
# FPTQ thresholds: a cross through the paper's (v0, v1) = (15, 150)
THR=(-m experiment=fptq_ablation calib=c4-32x512 eval=ppl-capped method.policy=layerwise
     method.middle=lae method.weight_method=rtn sweep=fptq-thresholds)
$PTQ "${THR[@]}" method.v0=15 method.v1=50,500
$PTQ "${THR[@]}" method.v0=5,30 method.v1=150
# Native vs llm-compressor, like for like (needs the `baselines` extra; reports/alignment/)
ALN=(-m experiment=alignment calib=c4-32x512 eval=ppl-capped sweep=alignment-c4-32x512)
$PTQ "${ALN[@]}" bits=w4a16 method=gptq,llmc_gptq method.symmetric=false
$PTQ "${ALN[@]}" bits=w4a16 method=gptq method.symmetric=false method.true_sequential=false
$PTQ "${ALN[@]}" bits=w8a8 method=smoothquant,llmc_smoothquant method.act_mode=dynamic_token
$PTQ "${ALN[@]}" bits=w4a16 method=awq_noclip,llmc_awq
$PTQ "${ALN[@]}" bits=w4a16 method=awq_noclip method.inputs_from=fp
# GPTQModel (second GPTQ reference; `make install-gptqmodel`), like for like with gptq per-layer
$PTQ "${ALN[@]}" bits=w4a16 method=gptqmodel_gptq method.symmetric=false method.true_sequential=false
# Calibration-seed spread of the GPTQ pair (seed 0 is the alignment sweep above)
SEEDS=(-m experiment=alignment calib=c4-32x512 eval=ppl-capped sweep=alignment-calib-seeds
       bits=w4a16 method.symmetric=false calib.seed=1,2)
$PTQ "${SEEDS[@]}" method=gptq method.true_sequential=false
$PTQ "${SEEDS[@]}" method=llmc_gptq
$PTQ "${SEEDS[@]}" method=gptqmodel_gptq method.true_sequential=false
# SmoothQuant's PTB cell on 16 windows (32k tokens) instead of 4
W16=(-m experiment=alignment calib=c4-32x512 eval=ppl eval.max_windows=16 sweep=alignment-16windows)
$PTQ "${W16[@]}" 'eval.datasets=[ptb]' bits=w8a8 method=smoothquant,llmc_smoothquant \
    method.act_mode=dynamic_token
# Where RTN w8a8 (dynamic per-token) loses: one linear type quantized at a time
$PTQ model=smollm2-135m method=rtn bits=w8a8 eval=sensitivity 'eval.groups=[type]' \
    eval.seqlen=2048 eval.max_windows=2 sweep=w8a8-breakdown
# Accuracy (lm-eval, local tasks): the CLI run of the accuracy issue (1 doc per task / MMLU
# subject: a pipeline check, not a measurement; batch 4 because MMLU's 5-shot contexts make
# batch-16 logits [16, ~2000, 49152] fp32 take ~6 GB), then commonsense at 200 docs per task
ACC=(-m model=smollm2-135m method=fp16,fptq bits=w16a16,w4a8 calib=c4-32x512)
$PTQ "${ACC[@]}" eval=commonsense,mmlu eval.limit=1 eval.batch_size=4 sweep=accuracy-limit1
$PTQ model=smollm2-135m method=fp16 bits=w16a16 eval=commonsense eval.limit=200 \
    sweep=accuracy-limit200
# Commonsense at 200 docs per task for every method at w4a8 (main-sweep quantized models)
$PTQ -m model=smollm2-135m method=rtn,fptq,smoothquant,gptq,awq bits=w4a8 calib=c4-32x512 \
    eval=commonsense eval.limit=200 sweep=accuracy-limit200
$PTQ -m model=smollm2-135m method=rtn,smoothquant bits=w8a8 calib=c4-32x512 \
    eval=commonsense eval.limit=200 sweep=accuracy-limit200
# ... and at w4a16 for the weight-only methods
$PTQ -m model=smollm2-135m method=rtn,gptq,awq bits=w4a16 calib=c4-32x512 \
    eval=commonsense eval.limit=200 sweep=accuracy-limit200
# MMLU 5-shot beyond the pipeline check: 5 questions per subject (285), fp16 vs FPTQ w4a8
$PTQ -m model=smollm2-135m method=fp16,fptq bits=w16a16,w4a8 calib=c4-32x512 \
    eval=mmlu eval.limit=5 eval.batch_size=4 sweep=mmlu-limit5
# QuIP at 2-4 bits beside RTN / GPTQ at the same widths (docs/methods_quip_quarot.md)
$PTQ -m "${BUDGET[@]}" method=quip bits=w2a16,w3a16,w4a16
$PTQ -m "${BUDGET[@]}" method=rtn,gptq bits=w3a16,w2a16
# QuaRot-style rotation (GPTQ weights, per-token activations) at w4a8 / w4a4, beside the
# other methods at w4a4
$PTQ -m "${BUDGET[@]}" method=quarot bits=w4a8,w4a4
$PTQ -m "${BUDGET[@]}" method=rtn,smoothquant,fptq bits=w4a4
$PTQ -m model=smollm2-135m method=quarot bits=w4a8 calib=c4-32x512 \
    eval=commonsense eval.limit=200 sweep=accuracy-limit200
