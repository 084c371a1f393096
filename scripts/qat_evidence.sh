#!/usr/bin/env bash
# LLM-QAT and KV-cache evidence on SmolLM2-135M (results/runs): perplexity on the first 4
# windows of WikiText-2 / C4 / PTB (eval=ppl-capped). Resumable: finished configs are skipped.
# LLM-QAT here runs a REDUCED budget (32 x 128 generated tokens, 20 steps of one sequence;
# sweep=qat-kv-reduced): the committed runs were made on 2 CPU cores shared with other jobs.
# The CPU-budget config itself (conf/method/llmqat.yaml: 64 x 256, 100 steps) is
# `method=llmqat` without the overrides. Its perplexity is on WikiText-2 only (first 4
# windows), for the same reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PTQ="${PTQ:-.venv/bin/ptqbench}"
BUDGET=(model=smollm2-135m calib=c4-32x512 eval=ppl-capped)
QAT=(method=llmqat method.n_samples=32 method.seq_len=128 method.steps=20
     ++method.grad_checkpointing=false sweep=qat-kv-reduced 'eval.datasets=[wikitext2]')
$PTQ "${BUDGET[@]}" sweep=qat-kv method=rtn bits=w4a8kv4
$PTQ "${BUDGET[@]}" "${QAT[@]}" bits=w4a8kv4
$PTQ "${BUDGET[@]}" "${QAT[@]}" bits=w4a8
$PTQ "${BUDGET[@]}" sweep=qat-kv method=fptq bits=w4a8kv4
