"""The thread policy (dip.threads): cores from affinity and cgroup quota, the load-aware default, the CLI option."""
from __future__ import annotations

import os

import pytest
import torch

from dip import threads
from dip.cli import build_parser
from dip.errors import DipError


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files(tmp_path):
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_available_cores_respects_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() == 4
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.available_cores() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.available_cores() == 1


@pytest.mark.parametrize("busy,expected", [(0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (9.0, 1)])
def test_recommended_threads_leaves_busy_cores(monkeypatch, busy, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    assert threads.recommended_threads(busy) == expected


def test_configure_threads(monkeypatch):
    previous = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "recommended_threads", lambda: 2)
        assert threads.configure_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_configure_threads_rejects_bad_counts(bad):
    with pytest.raises(DipError, match="threads"):
        threads.configure_threads(bad)


def test_cli_threads_option():
    args = build_parser().parse_args(["denoise", "in.png", "-o", "out.png", "--threads", "1"])
    assert args.threads == 1
    assert build_parser().parse_args(["denoise", "in.png", "-o", "out.png"]).threads is None


def test_cli_and_demo_ask_for_automatic_threads():
    """No --threads: the fit gets "auto" (recommended count + governor); the CLI leaves OpenMP's waiting alone."""
    from dip.cli import _threads

    assert _threads(None) == threads.AUTO and _threads(3) == 3
    assert not hasattr(threads, "apply_wait_policy")  # spinning is fastest on a quiet machine (RESULTS.md)
    assert build_parser().parse_args(["demo", "--threads", "1"]).threads == 1


def test_auto_threads_drop_to_one_when_a_fit_slows_down(monkeypatch):
    """Regression: the governor existed but no fit used it, so a fit beside a new busy process kept 2 threads."""
    import functools

    import numpy as np

    import dip

    previous = torch.get_num_threads()
    monkeypatch.setattr(threads, "recommended_threads", lambda busy=None: 2)
    # The governor's clock advances with the fit's steps (not the wall), so the machine's load cannot blur it.
    clock = _Clock()
    monkeypatch.setattr(threads, "ThreadGovernor", functools.partial(threads.ThreadGovernor, clock=clock))
    slow_from = 30

    seen = []

    def competing_process(step):  # steps become 10× slower, as when a peer thread is descheduled
        clock.t += 0.5 if step.iteration > slow_from else 0.05
        seen.append(torch.get_num_threads())

    img = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    try:
        torch.set_num_threads(3)
        dip.restore(img, iterations=slow_from + 12, network="small", progress=False, threads="auto",
                    callbacks=[competing_process])
        assert seen[0] == 2 and seen[-1] == 1  # the recommended count, then one thread once steps slowed
        assert torch.get_num_threads() == 3  # the caller's count comes back
        seen.clear()
        dip.restore(img, iterations=slow_from + 12, network="small", progress=False, threads=2,
                    callbacks=[competing_process])
        assert set(seen) == {2}  # an explicit count is left alone during the fit
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("bad", ["many", 0, 1.5, True])
def test_restore_refuses_bad_thread_counts(bad):
    import numpy as np

    import dip

    with pytest.raises(DipError, match="threads must be a positive integer or 'auto'"):
        dip.restore(np.zeros((16, 16), np.float32), iterations=1, network="small", progress=False, threads=bad)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_governor_drops_to_one_thread_when_steps_slow_down_and_probes_back():
    clock, counts = _Clock(), []
    gov = threads.ThreadGovernor(window=4, jump=2.0, probe_every=10, clock=clock,
                                 set_threads=lambda n: counts.append(n) or n, recommend=lambda: 2)
    gov.threads = 2
    for _ in range(10):  # quiet: 50 ms per step
        clock.t += 0.05
        gov.on_step()
    assert counts == []
    for _ in range(6):  # a competing process appears: 500 ms per step
        clock.t += 0.5
        gov.on_step()
    assert counts == [1] and gov.threads == 1
    for _ in range(10):  # at one thread for probe_every steps; the recommendation says 2 cores are free again
        clock.t += 0.08
        gov.on_step()
    assert counts == [1, 2] and gov.threads == 2


def test_governor_keeps_threads_when_steps_are_steady():
    clock, counts = _Clock(), []
    gov = threads.ThreadGovernor(window=4, probe_every=5, clock=clock, set_threads=lambda n: counts.append(n) or n,
                                 recommend=lambda: 2)
    gov.threads = 2
    for i in range(40):
        clock.t += 0.05 * (1.3 if i % 3 else 1.0)  # jitter below the jump factor
        gov.on_step()
    assert counts == [] and gov.state_dict() == {}
