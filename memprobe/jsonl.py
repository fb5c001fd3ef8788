"""Read and write memprobe's text format: JSONL, one `{"id": str, "text": str, ...}` object per line.

Why validate on read: a bad line found late (after an hour of capture) costs the hour; every error
names the file and line so the user can fix it in an editor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError
from memprobe.io.atomic import atomic_write
from memprobe.results import _plain


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of `path`; a bad line names file and line.

    The one JSONL parser: documents (`read_jsonl`) and other records (MIA scores) both read through it.
    """
    path = Path(path)
    if not path.is_file():
        raise MemprobeError(f"{path} does not exist or is not a file: give a JSONL file, one JSON object per line")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise MemprobeError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from exc


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Documents from `path`; blank lines are skipped, ids must be unique strings, texts non-empty."""
    path = Path(path)
    if not path.exists():
        raise MemprobeError(f"{path} does not exist: give a JSONL file with one {{'id', 'text'}} object per line")
    from memprobe.documents import validate_documents

    docs: list[dict[str, Any]] = []
    locations: list[str] = []
    for n, doc in json_lines(path):
        docs.append(doc)
        locations.append(f"{path}:{n}")
    return validate_documents(docs, locations=locations)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line atomically (memprobe.io.atomic_write); NaN becomes null."""
    lines = (json.dumps(_plain(record), ensure_ascii=False) + "\n" for record in records)
    return atomic_write(path, lines)
