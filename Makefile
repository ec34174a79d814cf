# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# This machine has no GPU: pin the CPU build of torch (overridable, e.g. TORCH_SPEC="torch==2.13.0+cu126").
TORCH_SPEC ?= torch==2.13.0
# Optional index for torch wheels (e.g. a CPU-only or a specific CUDA build); empty = the default index.
TORCH_INDEX ?=
# ONNX Runtime flavour: `cpu` (onnxruntime) or `gpu` (onnxruntime-gpu).
ORT_EXTRA ?= cpu
# Extras to install: `dev` adds the test tools; images use `EXTRAS=$(ORT_EXTRA)` only.
EXTRAS ?= dev,$(ORT_EXTRA)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all serve bundle alibi-env clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# The default run: everything but the `slow` soak and fault tests (pyproject's addopts).
test: $(STAMP)
	$(BIN)/python -m pytest

# Everything, the `slow` soak and fault tests too (about 8 more minutes).
test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" -s

serve: $(STAMP)
	$(BIN)/flowserve serve --repository model_repository --host 127.0.0.1 --port 8000

bundle: $(STAMP)
	$(BIN)/python -m models.training.bundle model_repository

# alibi-detect 0.11.x (Apache-2.0), for bench/drift.py only: it pins numpy < 2, so it gets its own environment.
alibi-env:
	$(PYTHON) -m venv .alibi-env
	.alibi-env/bin/pip install -q "alibi-detect==0.11.4" "numba==0.57.1" "scipy<1.12" "$(TORCH_SPEC)"

clean:
	rm -rf $(VENV) .pytest_cache
