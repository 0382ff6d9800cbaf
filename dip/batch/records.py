"""The job layer of a batch: what one image's job is, and the record of what happened to it.

This module depends on nothing else in :mod:`dip.batch`; both runners (the
local pool and Ray) speak only these types. A :class:`Record` is one line of
``manifest.jsonl``: enums in memory, their ``.value`` on disk.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any, Optional

from dip.fit.settings import StopReason


class RecordStatus(str, Enum):
    """What happened to one image of a batch. Compare by identity."""

    OK = "ok"  # restored and written
    FAILED = "failed"  # unreadable, diverged, out of memory, worker died … (retried first)
    SKIPPED = "skipped"  # its output was already there, valid, from the same settings

    def __str__(self) -> str:
        return self.value


def image_seed(run_seed: int, name: str) -> int:
    """The seed of image ``name`` in a run seeded with ``run_seed``.

    A stable hash (not Python's per-process salted ``hash``), so an image gets
    the same seed whichever worker, process or machine fits it.
    """
    digest = hashlib.sha256(f"{int(run_seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: any torch.Generator accepts it


@dataclass(frozen=True)
class Job:
    """One image to restore: where it comes from, where it goes, its seed and companions."""

    name: str  # the input's name relative to the searched folder: the key for its seed
    input: str
    output: str
    seed: int
    mask: Optional[str] = None
    reference: Optional[str] = None
    attempt: int = 0  # 0 for the first try
    problem: Optional[str] = None  # found while planning (a missing mask …): fails without a fit
    settings: Optional[str] = None  # fingerprint of the batch's settings, copied into the record

    def retry(self, failed: Record, run_seed: int) -> Job:
        """The next attempt of this job after the ``failed`` record.

        After a diverged fit the retry gets a fresh seed (the same seed would
        diverge again), derived from the run seed, the name and the attempt, so
        it stays reproducible; after any other failure (a crash, out of memory)
        the seed is kept, so the output is the one an undisturbed run gives.
        """
        attempt = self.attempt + 1
        seed = self.seed
        if failed.stop_reason is StopReason.DIVERGED:
            seed = image_seed(run_seed, f"{self.name}#retry{attempt}")
        return replace(self, attempt=attempt, seed=seed)


def _stop_reason(value: Any) -> Optional[StopReason]:
    if value is None or isinstance(value, StopReason):
        return value
    try:
        return StopReason(value)
    except ValueError:  # a manifest from an older dip: keep the record, drop the unknown reason
        return None


@dataclass(frozen=True)
class Record:
    """What happened to one image: one line of ``manifest.jsonl``."""

    input: str
    output: str
    status: RecordStatus
    iterations: Optional[int] = None
    stop_reason: Optional[StopReason] = None
    seconds: Optional[float] = None
    error: Optional[str] = None
    psnr: Optional[float] = None
    ssim: Optional[float] = None  # None without a reference or without scikit-image
    seed: Optional[int] = None
    attempts: int = 1
    settings: Optional[str] = None  # fingerprint of the settings the output was made with

    @classmethod
    def for_job(cls, job: Job, status: RecordStatus, **details: Any) -> Record:
        """The record of ``job`` (its current attempt, seed and settings) with ``status`` and ``details``."""
        values = dict(seed=job.seed, attempts=job.attempt + 1, settings=job.settings)
        values.update(details)
        return cls(input=job.input, output=job.output, status=status, **values)

    @property
    def failed(self) -> bool:
        """True when the image failed (and should be retried or reported)."""
        return self.status is RecordStatus.FAILED

    def to_json(self) -> dict:
        """Plain values (enums as their ``.value``) for one manifest line."""
        d = asdict(self)
        d["status"] = self.status.value
        d["stop_reason"] = self.stop_reason.value if self.stop_reason is not None else None
        for key in ("seconds", "psnr", "ssim"):  # JSON has no inf/NaN (a PSNR against an identical reference is inf)
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d

    @classmethod
    def from_json(cls, data: dict) -> Record:
        """The record of one manifest line; raises ``KeyError``/``ValueError``/``TypeError`` if it is not one."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = RecordStatus(data["status"])
        values["stop_reason"] = _stop_reason(data.get("stop_reason"))
        if not isinstance(values.get("input"), str) or not isinstance(values.get("output"), str):
            raise TypeError("a manifest record needs input and output paths")
        return cls(**values)
