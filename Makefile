# The two set-up commands of the README are `make demo` and `make test`.
PYTHON ?= python3
# torch is installed only when missing; on this project's machines 2.13.0 (CPU) comes from local disk.
TORCH ?= torch==2.13.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test demo test bench cuda-check clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
	$(PIP) setuptools wheel ninja numpy
	$(PIP) --no-build-isolation -e ".[demo]"

install-test: install
	$(PIP) --no-build-isolation -e ".[test,ray]"

demo: install
	dip demo -o dip-demo.png

test: install-test
	$(PYTHON) -m pytest -q tests

bench: install-test
	$(PYTHON) -m pytest benchmarks/ --benchmark-only

# Compile the CUDA kernels (sm_80, sm_90) against torch==2.14.1 in .cuda-venv,
# in a temporary build directory; nothing runs, no GPU needed. See the script.
cuda-check:
	bash scripts/cuda_check.sh

clean:
	rm -rf build dip/_C*.so *.egg-info .pytest_cache .benchmarks
