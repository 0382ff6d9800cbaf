"""Restore many images: one independent Deep Image Prior fit per file.

:func:`restore_many` plans the batch in the calling process
(:mod:`~dip.batch.planning`: inputs, outputs, masks, references, seeds, the
settings' fingerprint, which outputs are already done), then runs the fits on
a local pool of worker processes (:mod:`~dip.batch.local`) or as Ray tasks
(:mod:`~dip.batch.ray`). Workers write their outputs themselves, atomically;
only small :class:`~dip.batch.records.Record` objects come back, and the
calling process rewrites ``manifest.jsonl`` (:mod:`~dip.batch.manifest`) after
each one.

The modules depend one way: (``records``, ``interrupt``) ← ``worker`` ← (``local``, ``ray``);
``records`` ← ``planning``, ``manifest``; this module uses them all.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from dip.batch.interrupt import BatchInterrupted, StopRequest, stop_on_signals
from dip.batch.local import refuse_reimported_main, run_local
from dip.batch.manifest import MANIFEST, read_manifest, write_manifest
from dip.batch.planning import (
    find_companion,
    find_inputs,
    fit_settings,
    output_is_valid,
    plan_jobs,
    remove_stale_temporaries,
    settings_fingerprint,
    triage,
)
from dip.batch.records import Job, Record, RecordStatus, image_seed
from dip.batch.worker import cpu_count
from dip.errors import DipError
from dip.fit.settings import is_auto
from dip.io import MAX_PIXELS, check_max_pixels
from dip.problem import check_factor
from dip.tasks import Task

PathLike = Union[str, os.PathLike]

__all__ = ["BatchSummary", "Job", "Record", "RecordStatus", "cpu_count", "find_companion", "find_inputs",
           "image_seed", "output_is_valid", "restore_many"]


@dataclass
class BatchSummary:
    """What a batch did: one :class:`Record` per input (the lines of ``manifest.jsonl``)."""

    out_dir: Path
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def manifest(self) -> Path:
        """The path of ``manifest.jsonl``."""
        return self.out_dir / MANIFEST

    def count(self, status: RecordStatus) -> int:
        """Number of records with ``status``."""
        return sum(1 for r in self.records if r.status is status)

    @property
    def ok(self) -> int:
        """Images restored and written by this run."""
        return self.count(RecordStatus.OK)

    @property
    def failed(self) -> int:
        """Images that failed (after their retries)."""
        return self.count(RecordStatus.FAILED)

    @property
    def skipped(self) -> int:
        """Images whose output was already there, valid, from the same settings."""
        return self.count(RecordStatus.SKIPPED)

    def __str__(self) -> str:
        text = f"{self.ok} restored, {self.skipped} skipped, {self.failed} failed in {self.seconds:.1f} s"
        return text + (" (interrupted)" if self.interrupted else "")


_PER_IMAGE = {"seed": "seed= (the run seed)", "progress": "progress=", "reference": "reference_dir="}


def _check_arguments(task: Task, masks, retries, options: dict) -> None:
    if task is Task.CUSTOM:
        raise DipError("restore_many supports denoise, super_resolution and inpaint")
    if task is Task.INPAINT and masks is None:
        raise DipError("inpainting needs masks= (a folder of masks, a {stem} pattern, or one mask file)")
    for key, instead in _PER_IMAGE.items():
        if key in options:
            raise DipError(f"restore_many sets {key} per image; use {instead}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise DipError(f"retries must be a non-negative integer, got {retries!r}")
    check_factor(task, options.get("factor"), options.get("operator"))
    check_max_pixels(options.get("max_pixels", MAX_PIXELS))


def _check_device(options: dict, ray) -> None:
    """The device of every image's fit, checked by restore()'s rule before any worker starts: on Ray only what
    the string says (the cluster's nodes may have GPUs this process has not), locally that it is here too."""
    from dip.pipeline import parse_device, resolve_device

    if options.get("device") is not None:
        (parse_device if ray else resolve_device)(options["device"])


def _ensemble(options: dict) -> int:
    """The ensemble size of every image's fit, checked by restore()'s rule before any worker starts."""
    from dip.pipeline import ensemble_size

    return ensemble_size(options.get("ensemble", 1), options.get("network"), options.get("init"))


def restore_many(
    inputs: Union[PathLike, Iterable[PathLike]],
    out_dir: PathLike,
    task: Union[str, Task] = "denoise",
    *,
    workers: Optional[int] = None,
    threads: Optional[int] = None,
    ray: Union[None, bool, str] = None,
    ray_timeout: Optional[float] = None,
    seed: int = 0,
    masks: Optional[PathLike] = None,
    reference_dir: Optional[PathLike] = None,
    retries: int = 1,
    recursive: bool = False,
    force: bool = False,
    progress: bool = True,
    **restore_options,
) -> BatchSummary:
    """Restore every image of ``inputs`` into ``out_dir``, one independent fit per image.

    Call it from a function or under ``if __name__ == "__main__":`` in a
    script: worker processes start by importing the main script, and a
    top-level call would run again in each of them (this is refused with a
    :class:`DipError` that says so).

    Args:
        inputs: a folder (its image files), a glob pattern (``"scans/*.tif"``,
            ``"scans/**/*.tif"``) or a list of paths.
        out_dir: where ``<input stem>.png`` and ``manifest.jsonl`` are written
            (created if missing); not the input folder. On a Ray cluster it must
            be storage that every node sees.
        task: ``"denoise"``, ``"super_resolution"`` (give ``factor=``) or
            ``"inpaint"`` (give ``masks=``), or a :class:`dip.Task`.
        workers: local processes (default: one per GPU, else one per CPU core,
            at most one per image); ignored with ``ray``.
        threads: torch threads per local worker (default: cores // workers).
        ray: ``None``/``False`` runs locally; ``True`` uses the Ray runtime this
            process is connected to, or starts a local one (listening on
            127.0.0.1 only); a string is the address of a Ray cluster to join.
            Needs ``pip install 'dip[ray]'``.
        ray_timeout: seconds to wait for the cluster at ``ray`` to answer (default 20).
        seed: the run seed; each image's seed is derived from it and the file
            name (:func:`image_seed`), so outputs do not depend on scheduling.
        masks: for inpainting: a folder of masks named like the images (any
            image extension), a pattern such as ``"masks/{stem}_mask.png"``
            (``{name}``, ``{folder}`` also work), or one mask file for all images.
        reference_dir: clean images named like the inputs; the PSNR and SSIM
            of each output against its reference go in the manifest (SSIM
            needs scikit-image: null without it).
        retries: further attempts for an image that failed (unreadable,
            diverged — with a new seed —, out of memory, its worker died).
        recursive: also restore the images of sub-folders of ``inputs``; the
            outputs mirror the folder tree under ``out_dir``.
        force: redo images whose output exists but was made with other
            settings; without it such a folder is refused.
        progress: show an overall progress bar (done, failed, ETA).
        **restore_options: passed to :func:`dip.restore` for every image
            (``factor``, ``iterations``, ``network``, ``lr``, ``device``,
            ``ensemble``, ``noise_sigma`` — ``"auto"``: each image's own
            estimate — …); the fit settings among them and ``ensemble`` are
            validated before any worker starts.

    Returns:
        A :class:`BatchSummary`; its ``records`` are the lines of the manifest.
        SIGTERM or Ctrl-C stops the batch cleanly: fits in flight are abandoned
        (no partial output is left), the manifest lists what finished (and
        keeps the previous run's line of each image not redone yet), and the
        summary has ``interrupted=True``; running it again does the rest.
    """
    refuse_reimported_main()
    start = time.perf_counter()
    task = Task.parse(task)
    masks = restore_options.pop("mask", masks)
    _check_arguments(task, masks, retries, restore_options)
    _check_device(restore_options, ray)
    if isinstance(ray, str) and ray and ray != "auto":  # the address read now, not after the batch is planned
        from dip.batch.ray import parse_address

        parse_address(ray)
    factor = restore_options.get("factor") if task is Task.SUPER_RESOLUTION else None
    fingerprint = settings_fingerprint(task, factor, restore_options.get("network"),
                                       fit_settings(restore_options, seed), ensemble=_ensemble(restore_options),
                                       blind_sigma=is_auto(restore_options.get("noise_sigma")))

    out = Path(out_dir)
    found = find_inputs(inputs, recursive=recursive, out_dir=out)
    jobs = plan_jobs(found.sources, out, seed, masks, reference_dir, settings=fingerprint)
    manifest = out / MANIFEST
    previous = read_manifest(manifest)
    plan = triage(jobs, previous, factor, force, restore_options.get("max_pixels", MAX_PIXELS))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(jobs)
    summary = BatchSummary(out_dir=out, records=list(plan.records))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(plan.todo), desc="dip batch", unit="image",
               disable=not progress, dynamic_ncols=True)

    def lines() -> list[Record]:
        # A job not finished yet keeps its previous line: the output it describes (made with other settings,
        # or left by a failed attempt) is still there, and without the line a re-run would take it as done.
        finished = {r.input for r in summary.records}
        return summary.records + [previous[j.input] for j in plan.todo
                                  if j.input not in finished and j.input in previous]

    def report(record: Record) -> None:
        summary.records.append(record)
        write_manifest(manifest, lines())
        bar.update(1)
        bar.set_postfix(done=summary.ok + summary.skipped, failed=summary.failed, refresh=False)

    write_manifest(manifest, lines())
    with stop_on_signals() as stop:  # also over the last manifest write: a second Ctrl-C must not cut it short
        try:
            if plan.todo:
                _run(plan.todo, task, restore_options, seed, workers, threads, ray, ray_timeout, retries, report,
                     stop)
        except (BatchInterrupted, KeyboardInterrupt):
            summary.interrupted = True
        finally:
            bar.close()
        order = {job.input: i for i, job in enumerate(jobs)}
        summary.records.sort(key=lambda r: order.get(r.input, len(order)))
        write_manifest(manifest, sorted(lines(), key=lambda r: order.get(r.input, len(order))))
    summary.seconds = time.perf_counter() - start
    return summary


def _run(todo: list[Job], task: Task, options: dict, seed: int, workers, threads, ray, ray_timeout, retries: int,
         report: Callable[[Record], None], stop: StopRequest) -> None:
    if ray:
        from dip.batch.ray import run_on_ray

        run_on_ray(todo, task, options, seed, ray, retries, report, stop, timeout=ray_timeout)
    else:
        run_local(todo, task, options, seed, workers, threads, retries, report, stop)
