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
# torch and triton are used instead of the CPU build, and csrc/ is built in place into lora_kernels._C
# (against that torch; a failed build only leaves the CUDA kernels out).
VENV_FLAGS ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo --system-site-packages)
PYTEST_ARGS ?= -n auto -q

.PHONY: install test test-oldest bench aot-check aot-check-old-triton launch-check-floor-triton csrc-check clean readme-results

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e ".[test]"
	$(if $(VENV_FLAGS),($(BIN)/python -c "import setuptools" 2>/dev/null || $(BIN)/pip install -q setuptools) && $(BIN)/python setup.py -q build_ext --inplace || echo "make: lora_kernels._C not built: NF4 decoding stays on Triton")
	touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The oldest PEFT and transformers that pyproject.toml accepts, in a venv of their own (.venv-oldest):
# the tests that touch them (integrations, tools, the PEFT equality of the autograd tests). PEFT's
# layers changed their constructor in 0.19 and transformers' Trainer its logging and environment in 5.0.
OLDEST_PINS ?= peft==0.17.0 transformers==4.56.2
OLDEST_VENV := .venv-oldest
OLDEST_TESTS ?= tests/integrations tests/tools tests/autograd/test_lora_linear.py
test-oldest:
	$(PYTHON) -m venv $(VENV_FLAGS) $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(OLDEST_VENV)/bin/pip install -q $(TORCH_CPU)
	$(OLDEST_VENV)/bin/pip install -q -e ".[test]" $(OLDEST_PINS)
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider $(OLDEST_TESTS)

bench: install
	$(BIN)/python -m lora_kernels all

aot-check: install
	$(BIN)/python -m lora_kernels.tools.aot_check

# The same with the triton of our GPU machine (3.6: older ptxas, different register allocation),
# shadowing the venv's triton through PYTHONPATH. Skipped with a message if that wheel cannot be
# installed (no local copy, no network); a compile error or a spill still fails. Then the fast launch
# path's choices against that Triton's own dispatch (tools.launch_check, a dry run: no GPU).
OLD_TRITON ?= 3.6.0
aot-check-old-triton: install
	@if $(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/triton-$(OLD_TRITON) triton==$(OLD_TRITON); then \
	  PYTHONPATH=$(VENV)/triton-$(OLD_TRITON) $(BIN)/python -m lora_kernels.tools.aot_check && \
	  PYTHONPATH=$(VENV)/triton-$(OLD_TRITON) $(BIN)/python -m lora_kernels.tools.launch_check; \
	else echo "make: triton==$(OLD_TRITON) not installable here: AOT check with it SKIPPED"; fi

# The fast launch path against the dispatch of the oldest triton pyproject.toml accepts (3.4: its
# runtime differs most from the newest), a dry run as above; skipped with a message if that wheel
# cannot be installed.
FLOOR_TRITON ?= 3.4.0
launch-check-floor-triton: install
	@if $(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/triton-$(FLOOR_TRITON) triton==$(FLOOR_TRITON); then \
	  PYTHONPATH=$(VENV)/triton-$(FLOOR_TRITON) $(BIN)/python -m lora_kernels.tools.launch_check; \
	else echo "make: triton==$(FLOOR_TRITON) not installable here: launch check with it SKIPPED"; fi

# Compile-only check of csrc/*.cu (sm_80, sm_90) and csrc/*.cpp with nvcc: registers, spills (no GPU needed)
csrc-check: install
	$(BIN)/python -m lora_kernels.tools.csrc_check

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache .hypothesis lora_kernels/_C*.so

readme-results: install
	$(BIN)/python -m lora_kernels.tools.report
