"""Restore many images: one independent Deep Image Prior fit per file.

``restore_many`` plans the batch in the calling process (which inputs, their
outputs, masks, references and seeds; which outputs already exist and are
valid), then runs the fits on a local pool of worker processes or, when asked,
as Ray tasks (:mod:`dip.batch.ray`). Workers write their outputs themselves,
atomically; only small per-image records come back, and the calling process
keeps ``manifest.jsonl`` in the output folder up to date after each one.

A failed image (unreadable file, diverged fit, out of memory, dead worker) is
recorded and retried, and never stops the others. A re-run skips images whose
output is already there and valid, so an interrupted batch resumes where it
stopped.
"""
from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from PIL import Image

from dip.batch.records import RecordStatus
from dip.errors import DipError
from dip.fit.settings import StopReason
from dip.io import atomic_write

PathLike = Union[str, os.PathLike]

MANIFEST = "manifest.jsonl"
OUTPUT_SUFFIX = ".png"  # lossless and keeps an alpha channel, whatever the input format

OK, FAILED, SKIPPED = RecordStatus.OK, RecordStatus.FAILED, RecordStatus.SKIPPED


@dataclass(frozen=True)
class Job:
    """One image to restore: where it comes from, where it goes, and its seed."""

    name: str  # the input's file name: the key for the seed and for masks / references
    input: str
    output: str
    seed: int
    mask: Optional[str] = None
    reference: Optional[str] = None
    attempt: int = 0  # 0 for the first try
    problem: Optional[str] = None  # found while planning (a missing mask …): fails without a fit


@dataclass
class BatchSummary:
    """What a batch did: one record per input (the lines of ``manifest.jsonl``)."""

    out_dir: Path
    records: list = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST

    def count(self, status: str) -> int:
        """Number of records with ``status`` (``"ok"``, ``"failed"`` or ``"skipped"``)."""
        return sum(1 for r in self.records if r["status"] == status)

    @property
    def ok(self) -> int:
        return self.count(OK)

    @property
    def failed(self) -> int:
        return self.count(FAILED)

    @property
    def skipped(self) -> int:
        return self.count(SKIPPED)

    def __str__(self) -> str:
        text = f"{self.ok} restored, {self.skipped} skipped, {self.failed} failed in {self.seconds:.1f} s"
        return text + (" (interrupted)" if self.interrupted else "")


def image_seed(run_seed: int, name: str) -> int:
    """The seed of image ``name`` in a run seeded with ``run_seed``.

    A stable hash (not Python's per-process salted ``hash``), so an image gets
    the same seed whichever worker, process or machine fits it.
    """
    digest = hashlib.sha256(f"{int(run_seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: any torch.Generator accepts it


def find_inputs(inputs: Union[PathLike, Iterable[PathLike]]) -> list[Path]:
    """The image files of a folder, a glob pattern, or an explicit list of paths, sorted."""
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir():
            files = [p for p in path.iterdir() if p.is_file() and _is_image_name(p)]
        elif glob.has_magic(str(inputs)):
            files = [Path(p) for p in glob.glob(str(inputs)) if Path(p).is_file()]
        elif path.is_file():
            files = [path]
        else:
            raise DipError(f"no such folder or file, and not a glob pattern: {inputs}")
        if not files:
            raise DipError(f"no image files found in {inputs}")
        return sorted(files)
    files = [Path(p) for p in inputs]
    if not files:
        raise DipError("no inputs given")
    return files


def _is_image_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in Image.registered_extensions()


def _find_companion(source: Optional[PathLike], image: Path, what: str) -> Optional[str]:
    """The mask or reference of ``image`` from ``source``.

    ``source`` is a folder (a file of the same name, or of the same stem with
    any image extension), a pattern with ``{stem}`` or ``{name}``, or one file
    used for every image.
    """
    if source is None:
        return None
    text = str(source)
    if "{stem}" in text or "{name}" in text:
        candidate = Path(text.format(stem=image.stem, name=image.name))
        if not candidate.is_file():
            raise DipError(f"{what} for {image.name} not found: {candidate}")
        return str(candidate)
    folder = Path(source)
    if folder.is_dir():
        same = folder / image.name
        if same.is_file():
            return str(same)
        matches = sorted(p for p in folder.glob(glob.escape(image.stem) + ".*") if _is_image_name(p))
        if not matches:
            raise DipError(f"{what} for {image.name} not found in {folder}")
        return str(matches[0])
    if folder.is_file():
        return str(folder)
    raise DipError(f"{what} source {source} is neither a folder, a file, nor a pattern with {{stem}}")


def expected_size(job: Job, factor: Optional[int]) -> Optional[tuple[int, int]]:
    """(width, height) the output of ``job`` must have, read from the input's header; None if unreadable."""
    try:
        with Image.open(job.input) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    scale = factor or 1
    return w * scale, h * scale


def output_is_valid(path: PathLike, size: Optional[tuple[int, int]]) -> bool:
    """True when ``path`` is an image that decodes completely and has the given (width, height)."""
    if size is None or not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as img:
            if img.size != tuple(size):
                return False
            img.load()  # a truncated file fails here
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _record(job: Job, status: str, **details) -> dict:
    record = dict(input=job.input, output=job.output, status=status, iterations=None, stop_reason=None,
                  seconds=None, error=None, psnr=None, seed=job.seed, attempts=job.attempt + 1)
    record.update(details)
    return record


def restore_one(job: Job, task: str, options: dict, threads: Optional[int] = None) -> dict:
    """Fit one image and write its output atomically; returns its manifest record (never raises).

    This is what a worker runs. A diverged fit writes nothing (its output
    would be a partial image that a re-run would take as done).
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
        kwargs.setdefault("device", _WORKER_DEVICE)
        result = restore(job.input, task, seed=job.seed, progress=False, **kwargs)
        details = dict(iterations=result.iterations, stop_reason=result.stop_reason)
        if result.stop_reason is StopReason.DIVERGED:
            return _record(job, FAILED, error=f"the fit diverged (non-finite loss) after {result.iterations} iterations",
                           seconds=time.perf_counter() - start, **details)
        if result.interrupted:
            return _record(job, FAILED, error="interrupted", seconds=time.perf_counter() - start, **details)
        result.save(job.output)
        psnr = result.history.psnr_ema[-1] if result.history.psnr_ema else None
        return _record(job, OK, seconds=time.perf_counter() - start, psnr=psnr, **details)
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch: record it
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        error = str(exc) if isinstance(exc, DipError) else f"{type(exc).__name__}: {exc}"
        return _record(job, FAILED, error=error, seconds=time.perf_counter() - start)


def retry_job(job: Job, failed: Optional[dict], run_seed: int) -> Job:
    """The next attempt of ``job``.

    After a diverged fit the retry gets a fresh seed (the same seed would
    diverge again), derived from the run seed, the name and the attempt, so it
    stays reproducible; after any other failure (a crash, out of memory) the
    seed is kept, so the output is the one an undisturbed run gives.
    """
    attempt = job.attempt + 1
    seed = job.seed
    if failed is not None and failed.get("stop_reason") == StopReason.DIVERGED.value:
        seed = image_seed(run_seed, f"{job.name}#retry{attempt}")
    return Job(job.name, job.input, job.output, seed, job.mask, job.reference, attempt, job.problem)


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_workers(workers: Optional[int], n_jobs: int, threads: Optional[int] = None) -> tuple[int, int, list]:
    """(processes, torch threads per process, devices) for a local pool.

    With GPUs: one process per GPU by default, each bound to one GPU. On CPU:
    one process per core by default (independent small fits parallelise better
    than the threads of one fit), each with ``cores // processes`` threads, so
    the pool never runs more threads than there are cores. ``threads``
    overrides the thread count.
    """
    import torch

    if workers is not None and workers < 1:
        raise DipError(f"workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise DipError(f"threads must be at least 1, got {threads}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = cpu_count()
    if gpus:
        n = max(1, min(workers or gpus, n_jobs))
        return n, threads or max(1, cores // n), [f"cuda:{i % gpus}" for i in range(n)]
    n = max(1, min(workers or cores, n_jobs))
    return n, threads or max(1, cores // n), []


_WORKER_DEVICE: Optional[str] = None


def _init_worker(threads: int, devices) -> None:
    """Set up a pool process: its thread count, its GPU, and how it reacts to signals."""
    global _WORKER_DEVICE
    import torch

    torch.set_num_threads(threads)
    if devices is not None:
        try:
            _WORKER_DEVICE = devices.get_nowait()
        except Exception:  # noqa: BLE001 - a replacement process finds the queue empty: any GPU will do
            _WORKER_DEVICE = None
    # Ctrl-C reaches the whole process group; only the parent decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent sends SIGTERM to abandon a fit: exit through Python so that a
    # half-written output's temporary file is removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class _Interrupted(Exception):
    """SIGTERM or Ctrl-C in the calling process."""


def _raise_interrupted(signum, frame):
    # Further signals would interrupt the clean-up; the caller's handlers come back after it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Interrupted(signal.Signals(signum).name)


def _run_local(jobs: Sequence[Job], task: str, options: dict, run_seed: int, workers: Optional[int],
               threads: Optional[int], retries: int, report: Callable[[dict], None]) -> None:
    n, threads, devices = plan_workers(workers, len(jobs), threads)
    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's torch threads and CUDA state
    queue: deque = deque(jobs)
    while queue:
        device_queue = None
        if devices:
            device_queue = ctx.Queue()
            for d in devices:
                device_queue.put(d)
        before = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(threads, device_queue))
        running: dict = {}
        broken = False
        try:
            while (queue or running) and not broken:
                # At most one job per process in flight: when the pool breaks, the
                # jobs in flight are the ones that were running.
                while queue and len(running) < n and not broken:
                    job = queue.popleft()
                    try:
                        running[pool.submit(restore_one, job, task, options, threads)] = job
                    except BrokenProcessPool:  # a worker died since the last wait: this job never ran
                        queue.appendleft(job)
                        broken = True
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        record = future.result()
                    except BrokenProcessPool:
                        broken = True
                        record = _record(job, FAILED, error="the worker process died (killed, out of memory or crashed)")
                    _settle(job, record, queue, run_seed, retries, report)
            if broken:  # every job still in flight died with the pool
                for job in running.values():
                    record = _record(job, FAILED, error="the worker process died (killed, out of memory or crashed)")
                    _settle(job, record, queue, run_seed, retries, report)
                running.clear()
        except BaseException:
            _stop_pool(pool, set(multiprocessing.active_children()) - before)
            raise
        pool.shutdown(wait=True, cancel_futures=True)


def _settle(job: Job, record: dict, queue: deque, run_seed: int, retries: int,
            report: Callable[[dict], None]) -> None:
    if record["status"] == FAILED and job.attempt < retries:
        queue.append(retry_job(job, record, run_seed))
    else:
        report(record)


def _stop_pool(pool: ProcessPoolExecutor, processes, grace: float = 10.0) -> None:
    """Abandon the fits in flight: ask each worker to exit, then kill those that do not."""
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
    pool.shutdown(wait=True, cancel_futures=True)


def _remove_stale_temporaries(out_dir: Path, jobs: Iterable[Job]) -> None:
    """Remove temporary files left by a killed writer (see :func:`dip.io.atomic_write`)."""
    for job in jobs:
        out = Path(job.output)
        for tmp in out_dir.glob(f".{glob.escape(out.name)}.*.tmp{glob.escape(out.suffix)}"):
            try:
                tmp.unlink()
            except OSError:
                pass


def _read_manifest(path: Path) -> dict:
    records = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                records[record["input"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return records


def _write_manifest(path: Path, records: Iterable[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=False, allow_nan=False, default=str) + "\n" for r in records)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def restore_many(
    inputs: Union[PathLike, Iterable[PathLike]],
    out_dir: PathLike,
    task: str = "denoise",
    *,
    workers: Optional[int] = None,
    threads: Optional[int] = None,
    ray: Union[None, bool, str] = None,
    seed: int = 0,
    masks: Optional[PathLike] = None,
    reference_dir: Optional[PathLike] = None,
    retries: int = 1,
    progress: bool = True,
    **restore_options,
) -> BatchSummary:
    """Restore every image of ``inputs`` into ``out_dir``, one independent fit per image.

    Args:
        inputs: a folder (its image files), a glob pattern (``"scans/*.tif"``)
            or a list of paths.
        out_dir: where ``<input stem>.png`` and ``manifest.jsonl`` are written
            (created if missing). On a Ray cluster it must be storage that every
            node sees.
        task: ``"denoise"``, ``"super_resolution"`` (give ``factor=``) or
            ``"inpaint"`` (give ``masks=``).
        workers: local processes (default: one per GPU, else one per CPU core,
            at most one per image); ignored with ``ray``.
        threads: torch threads per local worker (default: cores // workers).
            On a busy machine one thread per fit is much faster: threads that
            wait for each other lose whenever one is descheduled.
        ray: ``None``/``False`` runs locally; ``True`` uses the Ray runtime this
            process is connected to, or starts a local one (listening on
            127.0.0.1 only); a string is the address of a Ray cluster to join.
            Needs ``pip install 'dip[ray]'``.
        seed: the run seed; each image's seed is derived from it and the file
            name (:func:`image_seed`), so outputs do not depend on scheduling.
            Outputs are byte-identical for the same seed and the same number of
            threads per fit.
        masks: for inpainting: a folder of masks named like the images (any
            image extension), a pattern such as ``"masks/{stem}_mask.png"``, or
            one mask file for all images.
        reference_dir: clean images named like the inputs; the PSNR of each
            output against its reference goes in the manifest (images without
            one get none).
        retries: further attempts for an image that failed (unreadable, diverged,
            out of memory, its worker died) before it is recorded as failed.
        progress: show an overall progress bar (done, failed, ETA).
        **restore_options: passed to :func:`dip.restore` for every image
            (``factor``, ``iterations``, ``network``, ``lr``, ``device`` …).

    Returns:
        A :class:`BatchSummary`; its ``records`` are the lines of the manifest.
        SIGTERM or Ctrl-C stops the batch cleanly: fits in flight are abandoned
        (no partial output is left), the manifest lists what finished, and the
        summary has ``interrupted=True``; running it again does the rest.
    """
    from dip.tasks import Task

    start = time.perf_counter()
    task = Task.parse(task)
    if task == "custom":
        raise DipError("restore_many supports denoise, super_resolution and inpaint")
    if task == "inpaint" and masks is None and "mask" not in restore_options:
        raise DipError("inpainting needs masks= (a folder of masks, a {stem} pattern, or one mask file)")
    if "mask" in restore_options:
        masks = restore_options.pop("mask")
    for key in ("seed", "progress", "reference"):
        if key in restore_options:
            raise DipError(f"restore_many sets {key} per image; use " +
                           {"seed": "seed= (the run seed)", "progress": "progress=",
                            "reference": "reference_dir="}[key])
    if not isinstance(retries, int) or retries < 0:
        raise DipError(f"retries must be a non-negative integer, got {retries!r}")
    if task == "super_resolution" and restore_options.get("factor") is None:
        raise DipError("super-resolution needs factor= (an integer from 2 to 32)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _plan(find_inputs(inputs), out, seed, masks, reference_dir)
    summary = BatchSummary(out_dir=out)
    factor = restore_options.get("factor") if task == "super_resolution" else None
    manifest = out / MANIFEST
    previous = _read_manifest(manifest)
    _remove_stale_temporaries(out, jobs)

    todo = []
    for job in jobs:
        if job.problem is not None:
            summary.records.append(_record(job, FAILED, error=job.problem))
        elif output_is_valid(job.output, expected_size(job, factor)):
            before = previous.get(job.input, {})
            carried = {k: before.get(k) for k in ("iterations", "stop_reason", "seconds", "psnr", "seed", "attempts")
                       if before.get(k) is not None}
            summary.records.append(_record(job, SKIPPED, **carried))
        else:
            todo.append(job)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="dip batch", unit="image",
               disable=not progress, dynamic_ncols=True)

    def report(record: dict) -> None:
        summary.records.append(record)
        _write_manifest(manifest, summary.records)
        bar.update(1)
        bar.set_postfix(done=summary.ok + summary.skipped, failed=summary.failed, refresh=False)

    _write_manifest(manifest, summary.records)
    restore_handlers = _catch_termination()
    try:
        if todo:
            if ray:
                from dip.batch.ray import run_on_ray

                run_on_ray(todo, task, restore_options, seed, ray, retries, report)
            else:
                _run_local(todo, task, restore_options, seed, workers, threads, retries, report)
    except (_Interrupted, KeyboardInterrupt):
        summary.interrupted = True
    finally:
        restore_handlers()
        bar.close()
    order = {job.input: i for i, job in enumerate(jobs)}
    summary.records.sort(key=lambda r: order.get(r["input"], len(order)))
    _write_manifest(manifest, summary.records)
    summary.seconds = time.perf_counter() - start
    return summary


def _plan(files: Sequence[Path], out: Path, run_seed: int, masks, reference_dir) -> list[Job]:
    by_output: dict = {}
    for f in files:
        by_output.setdefault(f.stem + OUTPUT_SUFFIX, []).append(f)
    clashes = [paths for paths in by_output.values() if len(paths) > 1]
    if clashes:
        names = ", ".join(" and ".join(str(p) for p in paths) for paths in clashes[:3])
        raise DipError(f"inputs would write the same output file: {names}; rename them or run them separately")
    jobs = []
    for f in files:
        mask = reference = problem = None
        try:
            mask = _find_companion(masks, f, "mask")
        except DipError as exc:
            problem = str(exc)
        try:
            reference = _find_companion(reference_dir, f, "reference")
        except DipError:
            pass  # a reference only adds a PSNR to the manifest; the image is restored without one
        jobs.append(Job(name=f.name, input=str(f), output=str(out / (f.stem + OUTPUT_SUFFIX)),
                        seed=image_seed(run_seed, f.name), mask=mask, reference=reference, problem=problem))
    return jobs


def _catch_termination() -> Callable[[], None]:
    """Turn SIGTERM (and SIGINT) into a clean stop of the batch; returns a function restoring the handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in saved:
        signal.signal(s, _raise_interrupted)

    def restore() -> None:
        for s, handler in saved.items():
            signal.signal(s, handler)

    return restore
