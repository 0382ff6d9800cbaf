"""How a fit holds memory: freed tensors stay in the heap for the next iteration (dip.memory.kept_heap)."""
from __future__ import annotations

import os
import resource
import threading

import numpy as np
import pytest
import torch

import dip
from dip import memory

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): a fresh mapping each time by default


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


needs_glibc = pytest.mark.skipif(not _glibc(), reason="the heap policy tunes glibc's malloc")


@pytest.fixture
def untuned(monkeypatch):
    for name in memory._USER_MALLOC_SETTINGS + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _settled() -> None:
    """Cycles enough for glibc's heap to hold a hole the 64 MiB block fits (the first few grow the heap)."""
    _faults_refilling(16)


def _faults_refilling(cycles: int = 4) -> float:
    """Page faults per cycle of allocating a 64 MiB tensor, writing it and freeing it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        t = torch.empty(BLOCK // 4)
        t.fill_(1.0)
        del t
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / cycles


@needs_glibc
def test_inside_the_block_a_freed_tensor_is_refilled_without_page_faults(untuned):
    pages = BLOCK / resource.getpagesize()
    assert _faults_refilling() > 0.5 * pages  # glibc's default: each cycle maps and faults the block afresh
    with memory.kept_heap(0) as applied:
        assert applied
        _settled()
        assert _faults_refilling() < 0.05 * pages
        holding = _rss()
    assert _rss() < holding - BLOCK // 2  # leaving the block gives the free memory back


@needs_glibc
def test_blocks_nest_and_overlap_across_threads(untuned):
    pages = BLOCK / resource.getpagesize()
    inner_left, outer_may_leave = threading.Event(), threading.Event()

    def other_fit():
        with memory.kept_heap(0):
            inner_left.wait()
            outer_may_leave.wait()

    thread = threading.Thread(target=other_fit)
    thread.start()
    try:
        with memory.kept_heap(0):
            pass
        inner_left.set()
        _settled()
        # the other thread's block is still open: the policy holds after this one closed
        assert _faults_refilling() < 0.05 * pages
        holding = _rss()
    finally:
        inner_left.set()
        outer_may_leave.set()
        thread.join()
    assert _rss() < holding - BLOCK // 2  # the last block to close gave the memory back


def test_a_users_own_malloc_tuning_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    calls = []
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a: calls.append(a))
    with memory.kept_heap(0) as applied:
        assert not applied
    assert calls == []


@needs_glibc
def test_the_heap_is_kept_only_with_room_for_its_fragmentation(untuned, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * 2**30)
    with memory.kept_heap(3 * 2**30) as applied:
        assert applied
    with memory.kept_heap(4 * 2**30) as applied:  # 3 × 4 GiB is more than the 10 GiB free
        assert not applied
    with memory.kept_heap(None) as applied:  # a need nobody can estimate
        assert not applied
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    with memory.kept_heap(1) as applied:  # free memory unknown
        assert not applied


@needs_glibc
def test_a_fit_runs_with_the_heap_kept(untuned):
    pages = BLOCK / resource.getpagesize()
    seen = []

    def refill(step):
        if step.iteration == 2:
            _settled()
            seen.append((_faults_refilling(), _rss()))

    img = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    dip.restore(img, network="small", iterations=2, callbacks=[refill], progress=False)
    faults, holding = seen[0]
    assert faults < 0.05 * pages
    assert _rss() < holding - BLOCK // 2  # and gives the memory back when it ends


def test_a_fit_whose_need_is_unknown_keeps_glibcs_policy():
    from dip.fit.loop import FitLoop
    from dip.fit.settings import FitSettings
    from dip.nn import build_network

    z = torch.rand(1, 32, 16, 16)
    custom = torch.nn.Conv2d(32, 3, 3, padding=1)
    loop = FitLoop(custom, z, lambda x: x, torch.rand(1, 3, 16, 16), FitSettings(iterations=1), [])
    assert loop._cpu_need() is None
    net = build_network("small")
    loop = FitLoop(net, z, lambda x: x, torch.rand(1, 3, 16, 16), FitSettings(iterations=1), [])
    assert loop._cpu_need() == memory.estimate_fit_bytes(net.config, 16, 16)


def test_a_containers_memory_limit_caps_the_free_memory(tmp_path, monkeypatch):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    (v2 / "memory.current").write_text("1073741824\n")
    assert memory.cgroup_memory_left(v2) == 3 * 2**30
    (v2 / "memory.max").write_text("max\n")
    assert memory.cgroup_memory_left(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2147483648\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("3221225472\n")
    assert memory.cgroup_memory_left(v1) == 0  # over its limit: nothing left, not a negative size
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory.cgroup_memory_left(v1) is None
    assert memory.cgroup_memory_left(tmp_path / "absent") is None

    monkeypatch.setattr(memory, "cgroup_memory_left", lambda: 2**30)
    assert memory.available_bytes(torch.device("cpu")) <= 2**30
    monkeypatch.setattr(memory, "cgroup_memory_left", lambda: None)
    assert memory.available_bytes(torch.device("cpu")) == memory._system_available_bytes()


@needs_glibc
def test_processes_running_fits_side_by_side_each_need_room_for_all(untuned, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * 2**30)
    monkeypatch.setattr(memory, "_processes_sharing", 1)
    memory.share_memory_with(2)
    with memory.kept_heap(1 * 2**30) as applied:  # 3 × 1 GiB for each of 2 processes: 6 of the 10 GiB free
        assert applied
    with memory.kept_heap(2 * 2**30) as applied:  # 12 GiB: not alone any more
        assert not applied


def test_a_batch_worker_counts_its_pool(monkeypatch):
    from dip.batch import local

    shared = []
    monkeypatch.setattr(local, "_die_with_parent", lambda pid: None)
    monkeypatch.setattr(local.signal, "signal", lambda *a: None)
    monkeypatch.setattr(memory, "share_memory_with", shared.append)
    previous = torch.get_num_threads()
    try:
        local._init_worker(1, None, os.getpid(), 3)
    finally:
        torch.set_num_threads(previous)
    assert shared == [3]
