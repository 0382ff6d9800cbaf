"""Run the jobs of a batch on a local pool of worker processes.

Processes are spawned (fork would copy the parent's torch threads and CUDA
state), at most one job in flight per process, so when the pool breaks the
jobs in flight are exactly those that were running. Each worker dies with its
parent: on Linux the kernel kills it (``PR_SET_PDEATHSIG``), elsewhere a thread
watching the parent's pid does.

A spawned worker starts by importing the caller's main script; a script
that calls :func:`dip.restore_many` without an ``if __name__ == "__main__":``
guard would start a batch in each worker. :func:`refuse_reimported_main`
detects that in the worker and tells the parent, which raises a clear error.
"""
from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Optional

from dip.batch.interrupt import POLL_SECONDS, StopRequest
from dip.batch.records import Job, Record, RecordStatus
from dip.batch.worker import cpu_count, quiet_progress_lock, restore_one
from dip.errors import DipError
from dip.tasks import Task

REIMPORT_MARKER = "DIP_BATCH_REIMPORT_MARKER"  # environment: file a re-importing worker writes its message to
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
WORKER_DIED = "the worker process died (killed, out of memory or crashed)"


def plan_workers(workers: Optional[int], n_jobs: int, threads: Optional[int] = None) -> tuple[int, int, list[str]]:
    """(processes, torch threads per process, devices) for a local pool.

    With GPUs: one process per GPU by default, each bound to one GPU. On CPU:
    one process per core by default (independent small fits parallelise better
    than the threads of one fit), each with ``cores // processes`` threads, so
    the pool never runs more threads than there are cores. ``threads``
    overrides the thread count.
    """
    import torch

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise DipError(f"workers must be a positive integer, got {workers!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DipError(f"threads must be a positive integer, got {threads!r}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = cpu_count()
    if gpus:
        n = max(1, min(workers or gpus, n_jobs))
        return n, threads or max(1, cores // n), [f"cuda:{i % gpus}" for i in range(n)]
    n = max(1, min(workers or cores, n_jobs))
    return n, threads or max(1, cores // n), []


# --- in the worker ---------------------------------------------------------------------------------------------

def reimported_main() -> Optional[str]:
    """The main script's path when this call comes from its top level re-run by a spawned worker, else None.

    A spawned process runs the parent's main script under the name
    ``__mp_main__``; a call made at that script's top level (not inside a
    function) is one the script's ``if __name__ == "__main__":`` guard would
    have kept from running.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
                return str(frame.f_globals.get("__file__") or "your script")
            frame = frame.f_back
        return None
    finally:
        del frame


def reimport_message(script: str) -> str:
    """What to do when a worker re-ran the batch of ``script``."""
    return (f"dip.restore_many is called at the top level of {script}, so every worker process re-runs it "
            "(worker processes start by importing the main script). Put the code that starts the batch under "
            "`if __name__ == \"__main__\":` (see the README, Batch)")


def refuse_reimported_main() -> None:
    """Stop a worker that is re-running the caller's main script, and tell the parent why.

    Called first thing in :func:`dip.restore_many`. In a worker of a dip pool
    it writes the message for the parent and exits quietly; elsewhere (a
    user's own process pool) it raises :class:`DipError`.
    """
    script = reimported_main()
    if script is None:
        return
    marker = os.environ.get(REIMPORT_MARKER)
    if marker:
        try:
            Path(marker).write_text(reimport_message(script), encoding="utf-8")
        except OSError:
            pass
        raise SystemExit(1)  # quietly: the parent says what to do
    raise DipError(reimport_message(script))


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die when the process that started it dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the thread below still does it
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="dip-parent-watch", daemon=True).start()


_WORKER_DEVICE: Optional[str] = None


def _init_worker(threads: int, devices, parent_pid: int, processes: int) -> None:
    """Set up a pool process: die with the parent, its thread count, its share of memory, its GPU, its signals."""
    global _WORKER_DEVICE
    _die_with_parent(parent_pid)
    import torch

    from dip.memory import share_memory_with

    torch.set_num_threads(threads)
    share_memory_with(processes)
    quiet_progress_lock()
    if devices is not None:
        try:
            _WORKER_DEVICE = devices.get_nowait()
        except Exception:  # noqa: BLE001 - a replacement process finds the queue empty: any GPU will do
            _WORKER_DEVICE = None
    # Ctrl-C reaches the whole process group; only the parent decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent sends SIGTERM to abandon a fit: leave through Python so that
    # a half-written output's temporary file is removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _run_job(job: Job, task: Task, options: dict, threads: int) -> Record:
    return restore_one(job, task, options, threads, device=_WORKER_DEVICE)


# --- in the parent ---------------------------------------------------------------------------------------------

class _Pool:
    """One ProcessPoolExecutor and what it takes to stop it cleanly."""

    def __init__(self, n: int, threads: int, devices: list[str], marker: Path):
        ctx = multiprocessing.get_context("spawn")
        self.device_queue = None
        if devices:
            self.device_queue = ctx.Queue()
            for d in devices:
                self.device_queue.put(d)
        self.before = set(multiprocessing.active_children())
        self.marker = marker
        self.executor = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                            initargs=(threads, self.device_queue, os.getpid(), n))

    def check_reimport(self) -> None:
        """Raise the worker's message if a worker stopped because it re-ran the caller's script."""
        if self.marker.is_file():
            raise DipError(self.marker.read_text(encoding="utf-8")) from None

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._close_queue()

    def stop(self, grace: float = 10.0) -> None:
        """Abandon the fits in flight: no new work, ask each worker to exit, then kill those that do not."""
        processes = set(multiprocessing.active_children()) - self.before
        self.executor.shutdown(wait=False, cancel_futures=True)  # a worker leaves once its fit is abandoned
        for proc in processes:
            if proc.is_alive() and proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._close_queue()

    def _close_queue(self) -> None:
        if self.device_queue is not None:
            self.device_queue.close()
            self.device_queue.join_thread()
            self.device_queue = None


def run_local(jobs: Sequence[Job], task: Task, options: dict, run_seed: int, workers: Optional[int],
              threads: Optional[int], retries: int, report: Callable[[Record], None], stop: StopRequest) -> None:
    """Run ``jobs`` on a local process pool and ``report`` each final record.

    A failed job is retried (``retries`` times) by :meth:`Job.retry`; a pool
    that broke (a worker killed) is replaced and the jobs it was running are
    failed attempts. A request on ``stop`` (checked every
    :data:`~dip.batch.interrupt.POLL_SECONDS`) or an exception here stops every
    worker and raises.
    """
    n, threads, devices = plan_workers(workers, len(jobs), threads)
    queue: deque[Job] = deque(jobs)
    with tempfile.TemporaryDirectory(prefix="dip-batch-") as tmp:
        marker = Path(tmp) / "reimported"
        saved = os.environ.get(REIMPORT_MARKER)
        os.environ[REIMPORT_MARKER] = str(marker)  # spawned workers inherit it
        try:
            while queue:
                stop.check()
                _run_pool(_Pool(n, threads, devices, marker), queue, task, options, threads, n, stop,
                          lambda job, record: _settle(job, record, queue, run_seed, retries, report))
        finally:
            if saved is None:
                os.environ.pop(REIMPORT_MARKER, None)
            else:
                os.environ[REIMPORT_MARKER] = saved


def _run_pool(pool: _Pool, queue: deque, task: Task, options: dict, threads: int, n: int, stop: StopRequest,
              settle: Callable[[Job, Record], None]) -> None:
    """Feed ``queue`` to ``pool`` until the queue is empty, the pool breaks or a stop is requested."""
    running: dict = {}
    broken = False
    try:
        while (queue or running) and not broken:
            stop.check()
            while queue and len(running) < n and not broken:
                job = queue.popleft()
                try:
                    running[pool.executor.submit(_run_job, job, task, options, threads)] = job
                except BrokenProcessPool:  # a worker died since the last wait: this job never ran
                    queue.appendleft(job)
                    broken = True
            if not running:
                break
            done, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool:
                    broken = True
                    pool.check_reimport()
                    record = Record.for_job(job, RecordStatus.FAILED, error=WORKER_DIED)
                settle(job, record)
        if broken:  # every job still in flight died with the pool
            pool.check_reimport()
            for job in running.values():
                settle(job, Record.for_job(job, RecordStatus.FAILED, error=WORKER_DIED))
            running.clear()
    except BaseException:
        pool.stop()
        raise
    pool.close()


def _settle(job: Job, record: Record, queue: deque, run_seed: int, retries: int,
            report: Callable[[Record], None]) -> None:
    if record.failed and job.attempt < retries:
        queue.append(job.retry(record, run_seed))
    else:
        report(record)
