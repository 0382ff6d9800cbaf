"""What a worker runs for one job, whichever runner started it (a local pool process or a Ray task).

Part of the job layer with :mod:`dip.batch.records` and :mod:`dip.batch.interrupt`:
the runners import these three modules and nothing else of :mod:`dip.batch`.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from dip.batch.records import Job, Record, RecordStatus
from dip.errors import DipError
from dip.fit.settings import StopReason
from dip.tasks import Task


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def quiet_progress_lock() -> None:
    """Give tqdm a thread lock instead of the multiprocessing lock it creates by default.

    tqdm's default lock is a named semaphore registered with multiprocessing's
    resource tracker; a worker that is stopped (or dies with its parent) never
    unregisters it, and the tracker then warns about a "leaked semaphore".
    A worker draws no bars, so a thread lock is all it needs.
    """
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def restore_one(job: Job, task: Task, options: dict, threads: Optional[int] = None,
                device: Optional[str] = None) -> Record:
    """Fit one image and write its output atomically; returns its record (never raises an ``Exception``).

    A diverged fit writes nothing: its output would be the last good iterate,
    which a re-run would take as done. ``device`` is used when ``options``
    names none (a local pool binds each process to one GPU).
    """
    import torch

    from dip.pipeline import restore

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        kwargs = dict(options)
        if job.mask is not None:
            kwargs["mask"] = job.mask
        if job.reference is not None:
            kwargs["reference"] = job.reference
        if kwargs.get("device") is None:
            kwargs["device"] = device
        result = restore(job.input, task, seed=job.seed, progress=False, **kwargs)
        details = dict(iterations=result.iterations, stop_reason=result.stop_reason)
        if result.stop_reason is StopReason.DIVERGED:
            return Record.for_job(job, RecordStatus.FAILED, seconds=time.perf_counter() - start,
                                  error=f"the fit diverged (non-finite loss) after {result.iterations} iterations",
                                  **details)
        if result.stop_reason is StopReason.INTERRUPTED:
            return Record.for_job(job, RecordStatus.FAILED, error="interrupted", seconds=time.perf_counter() - start,
                                  **details)
        os.makedirs(os.path.dirname(job.output) or ".", exist_ok=True)  # a sub-folder of a --recursive batch
        result.save(job.output)
        return Record.for_job(job, RecordStatus.OK, seconds=time.perf_counter() - start, psnr=result.psnr,
                              ssim=result.ssim, **details)
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch: record it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        error = str(exc) if isinstance(exc, DipError) else f"{type(exc).__name__}: {exc}"
        return Record.for_job(job, RecordStatus.FAILED, error=error, seconds=time.perf_counter() - start)
