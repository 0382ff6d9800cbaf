# The two set-up commands of the README are `make demo` and `make test`.
PYTHON ?= python3
# torch is installed only when missing; on this project's machines 2.13.0 (CPU) comes from local disk.
TORCH ?= torch==2.13.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test demo test test-pure test-torch-floor bench cuda-check gpu-check clean

# Installing compiles the C++ operators (a few minutes on 2 cores): it runs once, and again only when
# setup.py, pyproject.toml or csrc/ change. The stamps live in build/ (`make clean` removes them).
CSRC := $(shell find csrc -type f 2>/dev/null)
INSTALLED := build/.stamp-install
TEST_TOOLS := build/.stamp-test-tools

install: $(INSTALLED)

$(INSTALLED): setup.py pyproject.toml $(CSRC)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) "setuptools>=77" wheel ninja numpy
	@# The distribution was called "dip" before (a name PyPI gives to another tool): drop our old install.
	@$(PYTHON) -c "import importlib.metadata as m, sys; sys.exit('Deep Image Prior' not in (m.metadata('dip')['Summary'] or ''))" \
		2>/dev/null && $(PYTHON) -m pip uninstall --quiet -y dip || true
	$(PIP) --no-build-isolation -e ".[demo]"
	@mkdir -p build && touch $@

# The test tools are installed beside dip, not by reinstalling it, so `make test` after `make demo` compiles nothing.
install-test: $(TEST_TOOLS)

$(TEST_TOOLS): $(INSTALLED) pyproject.toml
	$(PIP) $$($(PYTHON) scripts/extras.py test ray)
	@mkdir -p build && touch $@

demo: install
	dip demo -o dip-demo.png

test: install-test
	$(PYTHON) -m pytest -q tests

# The pure-PyTorch path (the extension disabled): the restore, fit, export, batch and operator-fallback tests.
PURE_TESTS := tests/fit tests/test_restore.py tests/test_export.py tests/batch/test_batch_planning.py \
	tests/ops/test_lanczos.py tests/nn
test-pure: install-test
	DIP_DISABLE_EXTENSION=1 $(PYTHON) -m pytest -q $(PURE_TESTS)

# The oldest torch pyproject.toml allows (torch>=X.Y), in .venv-torch-floor: build, make test, make test-pure.
# It downloads several GB (PyPI's torch wheel for Linux brings CUDA), so .ci/run does not run it. See the script.
test-torch-floor:
	PYTHON=$(PYTHON) bash scripts/check_torch_floor.sh

bench: install-test
	$(PYTHON) -m pytest benchmarks/ --benchmark-only

# Compile the CUDA kernels (sm_80, sm_90) against torch==2.14.1 in .cuda-venv,
# in a temporary build directory; nothing runs, no GPU needed. See the script.
cuda-check:
	bash scripts/cuda_check.sh

# On a CUDA machine (torch and nvcc preinstalled, no network): build against its torch, run every
# CUDA test, time the iteration benchmark and the F16 restoration in under 8 minutes; writes
# gpu_check.json and gpu_check.log into OUT. `python3 scripts/gpu_check.py --dry-run` checks the plan.
OUT ?= ./gpu-check-out
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build dip/_C*.so *.egg-info .pytest_cache .benchmarks
