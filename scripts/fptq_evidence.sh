#!/usr/bin/env bash
# FPTQ static-activation evidence (issue 16; reports/fptq): act_range estimators, the symmetric
# grid, and the references they are judged against, on SmolLM2-135M and Gemma-3-270M.
# Resumable (finished configs are skipped). Base budget: C4 32 x 512 calibration, first 4
# windows of each perplexity set (Gemma: WikiText-2 and C4 only). Stages, in priority order
# (default: all): smollm2 | gemma | gemma_sweep | paper_calib.
#
set -uo pipefail
cd "$(dirname "$0")/.."
PTQ="${PTQ:-.venv/bin/ptqbench}"
PY="${PY:-.venv/bin/python}"
LOCK="${LOCK-flock /tmp/ptqbench-heavy.lock}"   # LOCK= runs without the shared lock
RUN=($LOCK $PTQ)
S=(model=smollm2-135m calib=c4-32x512 eval=ppl-capped bits=w4a8 sweep=fptq-static)
G=(model=gemma3-270m calib=c4-32x512 eval=ppl-capped 'eval.datasets=[wikitext2,c4]'
   sweep=fptq-static)

# method=fptq ships v0=0 (every group up to v1 equalized); method.v0=15 is the paper's
# threshold (method=fptq_paper pins the whole paper configuration).
P=(method.v0=15)

smollm2() {
    # the shipped configuration and its estimator / grid variants
    "${RUN[@]}" -m "${S[@]}" method=fptq
    "${RUN[@]}" -m "${S[@]}" method=fptq ++method.act_range=mse,percentile
    "${RUN[@]}" -m "${S[@]}" method=fptq ++method.w_grid=full
    # cost per bucket at the paper's thresholds: static bucket only (v1 just above v0)
    "${RUN[@]}" -m "${S[@]}" method=fptq "${P[@]}" method.v1=15.001
    # estimator: minmax (the paper's record exists) against percentile and MSE clipping
    "${RUN[@]}" -m "${S[@]}" method=fptq "${P[@]}" ++method.act_range=mse,percentile
    # the grid: FPTQ, its all-dynamic reference and rtn w4a16 on llm-compressor's grid
    "${RUN[@]}" -m "${S[@]}" method=fptq "${P[@]}" ++method.w_grid=full ++method.act_range=mse
    "${RUN[@]}" -m model=smollm2-135m calib=c4-32x512 eval=ppl-capped bits=w4a16 \
        sweep=fptq-static method=rtn ++method.w_grid=full
    "${RUN[@]}" -m "${S[@]}" method=fptq "${P[@]}" ++method.w_grid=full method.policy=all_dynamic
    # group size 32 (shipped configuration)
    "${RUN[@]}" -m "${S[@]}" method=fptq bits.group_size=32
    # ranges, position 0, int4 weight error before / after LAE (results/fptq/)
    $LOCK $PY scripts/fptq_static_ranges.py model=smollm2-135m calib=c4-32x512 calib.n_samples=8
}

gemma() {
    "${RUN[@]}" -m "${G[@]}" method=fp16 bits=w16a16
    "${RUN[@]}" -m "${G[@]}" method=rtn bits=w4a16 ++method.w_grid=narrow,full
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 "${P[@]}"
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 method.policy=all_dynamic
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 "${P[@]}" method.v1=15.001
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 ++method.w_grid=full
    "${RUN[@]}" -m "${G[@]}" method=fptq bits=w4a8 ++method.act_range=percentile
    # WikiText-2 only: estimator, group size and GPTQ weights after LAE (shipped policy)
    W=("${G[@]}" 'eval.datasets=[wikitext2]' method=fptq bits=w4a8)
    "${RUN[@]}" -m "${W[@]}" ++method.act_range=mse
    "${RUN[@]}" -m "${W[@]}" bits.group_size=64
    "${RUN[@]}" -m "${W[@]}" method.weight_method=gptq
    $LOCK $PY scripts/fptq_static_ranges.py model=gemma3-270m calib=c4-32x512
}

paper_calib() {
    # the paper's calibration budget, 128 x 2048 tokens of C4 (about 16x the base budget)
    "${RUN[@]}" -m "${S[@]/calib=c4-32x512/calib=c4-128x2048}" method=fptq
    "${RUN[@]}" -m "${G[@]/calib=c4-32x512/calib=c4-128x2048}" method=fptq bits=w4a8
}

gemma_sweep() {
    M=(model=gemma3-270m calib=c4-32x512 eval=ppl-capped 'eval.datasets=[wikitext2,c4]'
       sweep=gemma-main)
    "${RUN[@]}" -m "${M[@]}" method=rtn,smoothquant bits=w4a8
    "${RUN[@]}" -m "${M[@]}" method=gptq bits=w4a8,w4a16
    "${RUN[@]}" -m "${M[@]}" method=awq bits=w4a16,w4a8
}

for stage in ${@:-smollm2 gemma gemma_sweep paper_calib}; do
    "$stage"
done
