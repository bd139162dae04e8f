# The two commands of the README: `make quickstart` (the main job) and `make test` (CI).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# vLLM's CPU kernels compile once for every run and test of this checkout (serve/vllm.py
# keeps a compile cache the user set)
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: setup quickstart test test-fast cluster-up cluster-down lint bench bench-smoke reliability-report \
	gpu-check

setup:
	bash scripts/setup.sh

RUN_DIR ?= runs/quickstart
# llama.cpp (only `tune-launch export --format gguf` needs it) builds in the background
quickstart:
	LLAMA_CPP_BUILD=background bash scripts/setup.sh
	$(VENV)/bin/tune-launch recipes/quickstart.yaml --run-dir $(RUN_DIR)

cluster-up:
	bash cluster/testcluster/up.sh

cluster-down:
	bash cluster/testcluster/down.sh

lint: setup
	$(VENV)/bin/ruff check launcher cluster serve tests scripts
	$(VENV)/bin/ruff format --check launcher cluster serve tests scripts
	$(VENV)/bin/mypy

# the whole suite: unit, real multi-process training, real SLURM, real vLLM, bench smoke
# llama.cpp builds in the background meanwhile (scripts/setup.sh); the export tests run last.
# pytest-xdist workers: one more than this machine's CPUs (many tests wait on processes,
# servers and SLURM), at most 6; the grouping is tests/conftest.py's. The 30 slowest tests
# are printed at the end (docs/testing.md).
TEST_WORKERS ?= $(shell python3 -c 'import os; print(min(len(os.sched_getaffinity(0)) + 1, 6))')
test:
	LLAMA_CPP_BUILD=background bash scripts/setup.sh
	$(MAKE) cluster-up lint
	$(PY) -m pytest tests -v -n $(TEST_WORKERS) --dist loadscope --durations=30 -p no:cacheprovider

# every test not marked train, slurm, vllm or bench (no SLURM cluster, no vLLM, no
# multi-process training)
test-fast: setup
	$(PY) -m pytest tests -m "not train and not slurm and not vllm and not bench" -q -n $(TEST_WORKERS) --dist loadscope

bench: setup
	$(PY) tests/benchmarks/run_all.py

bench-smoke: setup
	$(PY) tests/benchmarks/run_all.py --smoke

# the GPU proof (docs/gpu-results.md): planner vs max_memory_allocated, throughput and MFU,
# FSDP2, QLoRA kernels; without CUDA its parts say so. GPU_CHECK_ARGS=--cpu-smoke: the tiny run
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check: setup
	PYTHON=$(PY) bash scripts/gpu_check.sh $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# the reliability tier (faults, bad input, secrets), then docs/reliability.md
reliability-report: setup cluster-up
	$(PY) scripts/reliability_report.py
