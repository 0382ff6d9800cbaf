"""How many CPU threads a fit uses, and how it reacts when other processes compete for the cores.

On a machine where other processes are running, torch's default (one thread
per core, threads that spin at every parallel region waiting for their
peers) collapses: a descheduled peer stalls every region. On a quiet machine
that same spinning is the fastest choice (measured: making waiting threads
sleep, ``OMP_WAIT_POLICY=PASSIVE``, costs ~45 % per iteration of the demo
workload at 2 threads; ``benchmarks/RESULTS.md``). So dip keeps OpenMP's
default and fixes the thread count instead. This module owns that policy,
used by single fits, the demo and the command line:

- ``available_cores()``: the cores this process may run on (CPU affinity),
  capped by a cgroup CPU quota (containers).
- ``recommended_threads()``: those cores minus the ones other processes are
  keeping busy right now (runnable tasks, sampled for ~0.1 s), at least 1.
- ``configure_threads(threads)``: applies an explicit count, or the
  recommendation when ``threads`` is None; returns the count in effect.
- ``ThreadGovernor``: a fit monitor that drops to one thread when the
  iteration time jumps (a competing process appeared) and probes back up.
  ``restore(threads="auto")`` (the command line's default) uses both.
- ``kept_thread_count()``: a block after which torch's thread count is what
  it was before (``restore(threads=...)`` sets it for its fit only).

This module imports neither torch nor the rest of dip at import time.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

#: The ``threads=`` value that asks for the recommended count plus a :class:`ThreadGovernor`.
AUTO = "auto"


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


@contextmanager
def kept_thread_count() -> Iterator[None]:
    """Within the block, set threads as a fit needs; on leaving it, torch's intra-op count is what it was."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class ThreadGovernor:
    """A fit monitor that drops to one thread when iterations suddenly slow down, and probes back up.

    Another process starting mid-fit makes every parallel region wait for a
    descheduled thread; one thread keeps the fit at the speed of one core.
    After ``probe_every`` steps on fewer threads, the count returns to
    ``recommended_threads()`` when that is higher. Implements the
    ``dip.fit.monitors.Monitor`` protocol (it never stops the fit, has no
    state worth checkpointing and is not rolled back by the divergence guard).
    ``clock``, ``set_threads`` and ``recommend`` are injectable for tests.
    """

    name = "threads"
    rolls_back = False

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

    def on_start(self, loop=None) -> None:
        """The fit starts: time steps from here (a resumed fit's earlier steps say nothing about now)."""
        self._last, self._recent = None, []

    def on_end(self, loop=None, reason=None) -> None:
        """Nothing to undo: the thread count stays where the governor left it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
