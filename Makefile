# The two set-up commands of the README are `make demo` and `make test`.
PYTHON ?= python3
# torch is installed only when missing; on this project's machines 2.13.0 (CPU) comes from local disk.
TORCH ?= torch==2.13.0
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test demo test bench clean

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

clean:
	rm -rf build dip/_C*.so *.egg-info .pytest_cache .benchmarks
