"""Benchmark settings: fixed threads and seeds, optional large sizes."""
import os

import pytest
import torch

#: Threads for every benchmark (this project's reference machine has 2 cores).
THREADS = int(os.environ.get("DIP_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", default=False,
                     help="also run the slow large sizes (512²)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--large") or os.environ.get("DIP_BENCH_LARGE") == "1":
        return
    skip = pytest.mark.skip(reason="large size: pass --large (or DIP_BENCH_LARGE=1) to run it")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "large: slow large-size benchmark, run with --large")
