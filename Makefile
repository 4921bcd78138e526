# mhd-uad: run `make help` for the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONDONTWRITEBYTECODE := 1

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==25.3 setuptools==84.2.1
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the locked dependencies and the package

RECIPE ?= auto

demo: $(STAMP) ## generate the demo data when absent, then run the whole DVC pipeline (beside a CUDA GPU: the gpu recipe)
	@if [ ! -d data ]; then \
	  $(BIN)/mhd-uad demo-data --out data --seed 0 && \
	  $(BIN)/dvc commit -q -f data.dvc && \
	  { git diff --quiet -- data.dvc || echo "warning: the generated data differ from the committed data.dvc"; }; \
	fi
	@recipe=$$($(BIN)/mhd-uad demo-recipe --recipe $(RECIPE) --apply) && echo "demo recipe: $$recipe"
	$(BIN)/dvc repro
	$(BIN)/mhd-uad report --readme README.md
	$(BIN)/dvc status

test: $(STAMP) ## lint, workflow lint, unit tests and the end-to-end pipeline test (what CI runs)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/actionlint .github/workflows/*.yml
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q --durations=10

test-fast: $(STAMP) ## unit tests only (the inner loop)
	$(BIN)/python -m pytest -q -m "not slow"

gpu-check: $(STAMP) ## on a CUDA GPU: CUDA tests, paper smoke, paper_profile and pipeline_throughput -> reports/gpu
	benchmarks/gpu_check.sh

params: $(STAMP) ## recompose params.yaml from conf/ (what `dvc exp run` does)
	$(BIN)/mhd-uad params

lock: ## regenerate requirements.lock from the current .venv
	{ grep '^#' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^mhd-uad' \
	  | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean: ## remove generated artifacts (keeps data/ and .venv)
	rm -rf artifacts models mlruns mlartifacts .pytest_cache .ruff_cache

.PHONY: help install demo test test-fast gpu-check params lock clean
