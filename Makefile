# unidiff — the two commands a new user types: `make quickstart` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Quiet, offline-friendly defaults for every command run from here.
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: setup test test-unit test-dist test-slurm test-e2e test-faults quickstart bench gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build 2.13.0; an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# lmms-eval for its CLI test, without its requirements (they pin wandb==0.25.0 and pull torchvision); the
	# packages its CLI imports are in the test extra.
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3
	touch $@

setup: $(BIN)/.installed

# Tests run two pytest workers on 2 cores: one thread each. Single-process commands (quickstart stages) keep
# torch's default; `launch local` gives each rank cores/nproc threads.
test test-unit test-dist test-slurm test-e2e test-faults: export OMP_NUM_THREADS ?= 1

test: setup
	$(BIN)/pytest -q -n 2 --dist loadgroup tests

test-unit: setup
	$(BIN)/pytest -q -m unit tests

test-dist: setup
	$(BIN)/pytest -q -m dist tests

test-slurm: setup
	$(BIN)/pytest -q -m slurm tests

test-e2e: setup
	$(BIN)/pytest -q -m e2e tests

# kill -9 at seeded random moments + rerun == uninterrupted (docs/faults.md); UNIDIFF_FAULT_KILLS=50 for the long run
test-faults: setup
	$(BIN)/pytest -q -m faults tests

quickstart: setup
	$(BIN)/unidiff quickstart configs/experiments/quickstart.yaml

bench: setup
	$(BIN)/python bench/run_all.py

# Once on a lent GPU (<= 8 min): unit subset, train + exact resume per engine, throughput -> bench/results/gpu_check.json
gpu-check: setup
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf $(VENV) runs data
