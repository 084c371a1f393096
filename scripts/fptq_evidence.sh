#!/usr/bin/env bash
# FPTQ static-activation evidence (issue 16; reports/fptq): act_range estimators, the symmetric
# grid, and the references they are judged against, on SmolLM2-135M and Gemma-3-270M.
# Resumable (finished configs are skipped). Base budget: C4 32 x 512 calibration, first 4
# windows of each perplexity set (Gemma: WikiText-2 and C4 only). Stages, in priority order
# (default: all): smollm2 | gemma | smollm2_extra | gemma_extra | gemma_sweep.
#
# Gemma-3-270M: the converted-model cache saved a character-level tokenizer (issue 15 item
# 17), so Gemma runs use a cache directory whose `converted` entry is a plain file: the copy
# cannot be written and every load parses the GGUF with its own tokenizer.
set -uo pipefail
cd "$(dirname "$0")/.."
PTQ="${PTQ:-.venv/bin/ptqbench}"
PY="${PY:-.venv/bin/python}"
LOCK="${LOCK-flock /tmp/ptqbench-heavy.lock}"   # LOCK= runs without the shared lock
RUN=($LOCK $PTQ)
S=(model=smollm2-135m calib=c4-32x512 eval=ppl-capped bits=w4a8 sweep=fptq-static)
G=(model=gemma3-270m calib=c4-32x512 eval=ppl-capped 'eval.datasets=[wikitext2,c4]'
   sweep=fptq-static-gemma)
GEMMA_CACHE=.cache/gemma-gguf-only
mkdir -p "$GEMMA_CACHE" && { [ -f "$GEMMA_CACHE/converted" ] || : > "$GEMMA_CACHE/converted"; }

smollm2() {
    # estimator: minmax (the paper's record exists) against percentile and MSE clipping
    "${RUN[@]}" -m "${S[@]}" method=fptq ++method.act_range=mse,percentile
    # the grid: FPTQ, its all-dynamic reference and rtn w4a16 on llm-compressor's grid
    "${RUN[@]}" -m "${S[@]}" method=fptq ++method.w_grid=full ++method.act_range=mse
    "${RUN[@]}" -m model=smollm2-135m calib=c4-32x512 eval=ppl-capped bits=w4a16 \
        sweep=fptq-static method=rtn ++method.w_grid=full
    "${RUN[@]}" -m "${S[@]}" method=fptq ++method.w_grid=full method.policy=all_dynamic
}

gemma() {
    export PTQBENCH_CACHE="$GEMMA_CACHE"
    "${RUN[@]}" -m "${G[@]}" method=fp16 bits=w16a16
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 ++method.act_range=minmax,mse
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 method.policy=all_dynamic
    "${RUN[@]}" -m "${G[@]}" method=rtn bits=w4a16 ++method.w_grid=narrow,full
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 ++method.w_grid=full ++method.act_range=mse
    unset PTQBENCH_CACHE
}

smollm2_extra() {
    # cost per bucket: v1 just above v0 sends the LAE bucket to dynamic (static bucket only)
    "${RUN[@]}" -m "${S[@]}" method=fptq method.v1=15.001 ++method.act_range=minmax,mse
    # all static with MSE ranges: how much of the all-static loss is the estimator
    "${RUN[@]}" -m "${S[@]}" method=fptq method.policy=all_static ++method.act_range=mse
    $LOCK $PY scripts/fptq_static_ranges.py model=smollm2-135m \
        calib=c4-32x512
    # group size 32 and GPTQ weights after LAE, with MSE ranges
    "${RUN[@]}" -m "${S[@]}" method=fptq ++method.act_range=mse bits.group_size=32
    "${RUN[@]}" -m "${S[@]}" method=fptq ++method.act_range=mse method.weight_method=gptq
    "${RUN[@]}" -m model=smollm2-135m calib=c4-32x512 eval=ppl-capped bits=w4a16 \
        sweep=fptq-static method=llmc_rtn
}

gemma_extra() {
    export PTQBENCH_CACHE="$GEMMA_CACHE"
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 method.v1=15.001 ++method.act_range=minmax,mse
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 ++method.w_grid=full method.policy=all_dynamic
    $LOCK $PY scripts/fptq_static_ranges.py model=gemma3-270m \
        calib=c4-32x512 paths.cache_dir="$GEMMA_CACHE"
    unset PTQBENCH_CACHE
}

gemma_sweep() {
    export PTQBENCH_CACHE="$GEMMA_CACHE"
    M=(model=gemma3-270m calib=c4-32x512 eval=ppl-capped 'eval.datasets=[wikitext2,c4]'
       sweep=gemma-main)
    "${RUN[@]}" -m "${M[@]}" method=rtn,smoothquant,gptq,fptq bits=w4a8
    "${RUN[@]}" -m "${M[@]}" method=gptq bits=w4a16
    "${RUN[@]}" -m "${M[@]}" method=awq bits=w4a16,w4a8
    unset PTQBENCH_CACHE
}

for stage in ${@:-smollm2 gemma smollm2_extra gemma_extra gemma_sweep}; do
    "$stage"
done
