"""Benchmark settings: fixed threads, optional large sizes (``--large`` or DIP_BENCH_LARGE=1)."""
import os

import torch

#: Threads for every benchmark (this project's reference machine has 2 cores).
THREADS = int(os.environ.get("DIP_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", default=False, help="also run the slow large sizes (512²)")


def pytest_configure(config):
    # The benchmark modules read this when they are collected, after configuration.
    if config.getoption("--large"):
        os.environ["DIP_BENCH_LARGE"] = "1"
