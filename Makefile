# Two entry points (see README):
#   make bench   install, then run the LoRA and QLoRA benchmarks and the memory profile on whatever device is present
#   make test    install, then run the test suite (CPU: Triton kernels under the interpreter)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (installed from local disk on our CI machines). Pinned: any other spec
# would download a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
# On a machine with an NVIDIA GPU the venv sees the system site-packages, so the machine's own CUDA
# torch and triton are used instead of the CPU build.
VENV_FLAGS ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo --system-site-packages)
PYTEST_ARGS ?= -n auto -q

.PHONY: install test bench aot-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m lora_kernels all

aot-check: install
	$(BIN)/python -m lora_kernels.tools.aot_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
