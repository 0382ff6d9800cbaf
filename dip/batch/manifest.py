"""``manifest.jsonl``: one :class:`~dip.batch.records.Record` per input, rewritten atomically after each image."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from dip.batch.records import Record
from dip.io import atomic_write

MANIFEST = "manifest.jsonl"


def read_manifest(path: Path) -> dict[str, Record]:
    """The records of the manifest at ``path`` by input path; lines that are not records are ignored."""
    records: dict[str, Record] = {}
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = Record.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        records[record.input] = record
    return records


def write_manifest(path: Path, records: Iterable[Record]) -> None:
    """Replace the manifest at ``path`` with ``records``, atomically (a reader sees the old or the new file)."""
    text = "".join(json.dumps(r.to_json(), allow_nan=False, default=str) + "\n" for r in records)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
