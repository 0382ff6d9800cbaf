"""The vocabulary of a batch: the status of each image's record in ``manifest.jsonl``."""
from __future__ import annotations

from enum import Enum


class RecordStatus(str, Enum):
    """What happened to one image of a batch. Compare by identity."""

    OK = "ok"  # restored and written
    FAILED = "failed"  # unreadable, diverged, out of memory, worker died … (retried first)
    SKIPPED = "skipped"  # its output was already there, valid, from the same settings

    def __str__(self) -> str:
        return self.value
