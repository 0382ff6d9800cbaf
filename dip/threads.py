"""How many CPU threads a fit uses, and how its OpenMP threads wait.

On a machine where other processes are running, torch's default (one thread
per core, threads that spin at every parallel region waiting for their
peers) collapses: a descheduled peer stalls every region. This module owns
the policy used by single fits, the demo and the command line:

- ``available_cores()``: the cores this process may run on (CPU affinity),
  capped by a cgroup CPU quota (containers).
- ``recommended_threads()``: those cores minus the ones other processes are
  keeping busy right now (runnable tasks, sampled for ~0.1 s), at least 1.
- ``configure_threads(threads)``: applies an explicit count, or the
  recommendation when ``threads`` is None; returns the count in effect.
- ``ThreadGovernor``: a fit monitor that drops to one thread when the
  iteration time jumps (a competing process appeared) and probes back up.
- ``apply_wait_policy()``: for programs that start before torch is imported:
  OpenMP threads that sleep instead of spinning while waiting. The OpenMP
  runtime reads it once, when torch loads it; importing ``dip`` loads torch,
  so the ``dip`` command line restarts itself once with ``WAIT_POLICY_ENV``.

This module imports neither torch nor the rest of dip at import time.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

#: Environment the OpenMP runtime reads at start-up: waiting threads yield the core.
WAIT_POLICY_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """CPUs allowed by this process's cgroup quota (v2 ``cpu.max`` or v1 CFS quota), or None when unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup quota (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def _runnable_elsewhere(samples: int = 5, interval: float = 0.02) -> float:
    """Mean number of runnable tasks other than this one (``/proc/loadavg``'s 4th field), over a short window."""
    counts = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            counts.append(max(0, int(running) - 1))  # minus the reader itself
        except (OSError, ValueError, IndexError):
            return 0.0
        if i + 1 < samples:
            time.sleep(interval)
    return sum(counts) / len(counts)


def recommended_threads(busy: Optional[float] = None) -> int:
    """Threads for one fit: the available cores minus those other processes keep busy (``busy``, measured
    when None), at least 1."""
    cores = available_cores()
    if busy is None:
        busy = _runnable_elsewhere()
    return max(1, min(cores, cores - int(math.floor(busy + 0.5))))


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``threads``, or to ``recommended_threads()`` when None; returns the count."""
    import torch

    from dip.errors import DipError

    if threads is None:
        threads = recommended_threads()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DipError(f"threads must be a whole number of at least 1 (or None for automatic), got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def apply_wait_policy() -> bool:
    """Make OpenMP threads sleep rather than spin while waiting, unless the user chose a policy already.

    Only effective before torch is imported (the runtime reads the environment once); returns whether
    it was applied.
    """
    if "torch" in sys.modules:
        return False
    applied = False
    for key, value in WAIT_POLICY_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            applied = True
    return applied


class ThreadGovernor:
    """A fit monitor that drops to one thread when iterations suddenly slow down, and probes back up.

    Another process starting mid-fit makes every parallel region wait for a
    descheduled thread; one thread keeps the fit at the speed of one core.
    After ``probe_every`` steps on fewer threads, the count returns to
    ``recommended_threads()`` when that is higher. Implements the
    ``dip.fit.monitors.Monitor`` protocol (it never stops the fit and has no
    state worth checkpointing). ``clock`` and ``set_threads`` are injectable for tests.
    """

    name = "threads"

    def __init__(self, window: int = 8, jump: float = 2.0, probe_every: int = 200, clock=time.perf_counter,
                 set_threads=None, recommend=None):
        self.window, self.jump, self.probe_every = window, jump, probe_every
        self._clock = clock
        self._set = set_threads if set_threads is not None else configure_threads
        self._recommend = recommend if recommend is not None else recommended_threads
        self._last: Optional[float] = None
        self._recent: list = []
        self._best: dict = {}  # threads -> best median step time seen with that many
        self._since_change = 0
        self._steps = 0
        self.threads: Optional[int] = None
        #: (step index, new thread count) of every change, for the record
        self.changes: list = []

    def _current(self) -> int:
        if self.threads is None:
            import torch

            self.threads = torch.get_num_threads()
        return self.threads

    def _switch(self, threads: int) -> None:
        self.threads = self._set(threads)
        self.changes.append((self._steps, self.threads))
        self._recent, self._since_change, self._last = [], 0, None

    def on_step(self, step=None):
        now = self._clock()
        self._steps += 1
        threads = self._current()
        if self._last is not None:
            self._recent = (self._recent + [now - self._last])[-self.window:]
        self._last = now
        self._since_change += 1
        if len(self._recent) == self.window:
            median = sorted(self._recent)[self.window // 2]
            best = min(self._best.get(threads, median), median)
            self._best[threads] = best
            if threads > 1 and median > self.jump * best:
                self._switch(1)
                return None
        if self._since_change >= self.probe_every:
            wanted = self._recommend()
            if wanted > threads:
                self._switch(wanted)
            else:
                self._since_change = 0
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
