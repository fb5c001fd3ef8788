"""Read and write memprobe's text format: JSONL, one `{"id": str, "text": str, ...}` object per line.

Why validate on read: a bad line found late (after an hour of capture) costs the hour; every error
names the file and line so the user can fix it in an editor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError
from memprobe.io.atomic import atomic_write
from memprobe.results import _plain


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Documents from `path`; blank lines are skipped, ids must be unique strings, texts non-empty."""
    path = Path(path)
    if not path.exists():
        raise MemprobeError(f"{path} does not exist: give a JSONL file with one {{'id', 'text'}} object per line")
    from memprobe.documents import validate_documents

    docs: list[dict[str, Any]] = []
    locations: list[str] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MemprobeError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            docs.append(doc)
            locations.append(f"{path}:{n}")
    return validate_documents(docs, locations=locations)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line atomically (memprobe.io.atomic_write); NaN becomes null."""
    lines = (json.dumps(_plain(record), ensure_ascii=False) + "\n" for record in records)
    return atomic_write(path, lines)
