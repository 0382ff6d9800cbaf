# The two set-up commands of the README are `make demo` and `make test`.
PYTHON ?= python3
# torch is installed only when missing; on this project's machines 2.13.0 (CPU) comes from local disk.
TORCH ?= torch==2.13.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test demo test bench cuda-check gpu-check clean

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

# On a CUDA machine (torch and nvcc preinstalled, no network): build against its torch, run every
# CUDA test, time the iteration benchmark and the F16 restoration in under 8 minutes; writes
# gpu_check.json and gpu_check.log into OUT. `python3 scripts/gpu_check.py --dry-run` checks the plan.
OUT ?= ./gpu-check-out
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build dip/_C*.so *.egg-info .pytest_cache .benchmarks
