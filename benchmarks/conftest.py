"""Benchmark settings: threads (DIP_BENCH_THREADS), heap (DIP_BENCH_HEAP), device (--device / DIP_BENCH_DEVICE), large sizes
(--large / DIP_BENCH_LARGE=1), and the machine description written into the JSON (--benchmark-json)."""
import os

import pytest
import torch
from bench_settings import THREADS, heap_policy, machine

torch.set_num_threads(THREADS)


@pytest.fixture(scope="session", autouse=True)
def _heap():
    """Every benchmark holds memory under one policy (``DIP_BENCH_HEAP``), as a fit does by default."""
    with heap_policy():
        yield


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", default=False, help="also run the slow large sizes (512²)")
    parser.addoption("--device", default=None, choices=["cpu", "cuda"],
                     help="device of the benchmarks that take one (default: $DIP_BENCH_DEVICE or cpu)")


def pytest_configure(config):
    # The benchmark modules read these when they are collected, after configuration.
    if config.getoption("--large"):
        os.environ["DIP_BENCH_LARGE"] = "1"
    if config.getoption("--device"):
        os.environ["DIP_BENCH_DEVICE"] = config.getoption("--device")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dip"] = machine()
