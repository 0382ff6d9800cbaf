"""The thread policy (dip.threads): cores from affinity and cgroup quota, the load-aware default, the CLI option."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_wait_policy_only_before_torch_and_never_over_the_users_choice():
    # Loaded from its file, as a launcher would before torch (importing the dip package loads torch).
    code = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('dip_threads', {threads.__file__!r})\n"
        "threads = importlib.util.module_from_spec(spec); spec.loader.exec_module(threads)\n"
        "assert 'torch' not in sys.modules\n"
        "print(threads.apply_wait_policy(), os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "PASSIVE"]
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"),
                         capture_output=True, text=True)
    assert out.stdout.split() == ["False", "ACTIVE"]
    assert threads.apply_wait_policy() is False  # torch is loaded in this process


def test_cli_threads_option():
    args = build_parser().parse_args(["denoise", "in.png", "-o", "out.png", "--threads", "1"])
    assert args.threads == 1
    assert build_parser().parse_args(["denoise", "in.png", "-o", "out.png"]).threads is None


_WAIT_POLICY_PROBE = (
    "import os, sys\n"
    "from dip import cli\n"
    "status = cli.main(sys.argv[1:])\n"
    "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules and 'loaded-before' or '')\n"
)


@pytest.mark.parametrize("env,argv,expected", [
    ({}, ["denoise", "missing.png", "-o", "out.png"], "PASSIVE"),  # a fit: waiting threads sleep
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ["denoise", "missing.png", "-o", "out.png"], "ACTIVE"),  # the user's choice
    ({}, ["info"], "None"),  # no fit, no policy
])
def test_cli_sets_the_wait_policy_before_torch_loads(tmp_path, env, argv, expected):
    """The OpenMP runtime reads OMP_WAIT_POLICY once, when torch loads it: the CLI sets it first (no restart)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    clean["PYTHONPATH"] = os.pathsep.join([str(root), clean.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _WAIT_POLICY_PROBE, *argv], cwd=tmp_path, capture_output=True,
                          text=True, env={**clean, **env}, timeout=120)
    assert proc.stdout.splitlines()[-1].split()[0] == expected, (proc.stdout, proc.stderr)


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
