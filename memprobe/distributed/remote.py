"""Job outputs on fsspec URLs (object storage): directories published with a completion marker.

Why a marker and not a rename: object stores have no atomic rename of a directory (often not of a
file either). So each file goes to a temp key, is copied to its final key, and a `_COMPLETE.json`
listing every file with its size and sha256 is written last; a reader trusts a directory only when
the marker is there and every file matches it. Entries' parts are published as they finish (a rerun
anywhere fetches them instead of recomputing) and the merged store is published last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError
from memprobe.io import atomic_path

MARKER = "_COMPLETE.json"
SCHEMES = ("file", "memory")  # tested; other fsspec schemes go through the same calls


def is_url(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def _fs(url: str):
    import fsspec

    scheme = url.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise MemprobeError(f"output URL scheme {scheme!r} is not supported yet: use {', '.join(SCHEMES)}:// or a local path")
    return fsspec.core.url_to_fs(url)


def publish(local: str | Path, url: str) -> dict[str, Any]:
    """Copy every file under `local` to `url` (temp key, then final key), then the marker, last."""
    from memprobe.distributed.plan import file_sha256

    fs, root = _fs(url)
    local = Path(local)
    files = {}
    for path in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
        rel = path.relative_to(local).as_posix()
        key = f"{root}/{rel}"
        fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), key + ".tmp")  # streamed, never whole in memory
        fs.copy(key + ".tmp", key)
        fs.rm(key + ".tmp")
        files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    fs.pipe_file(f"{root}/{MARKER}", json.dumps({"files": files}, sort_keys=True).encode())
    return files


def published(url: str) -> dict[str, Any] | None:
    """The file list of a completely published directory at `url`, or None."""
    fs, root = _fs(url)
    if not fs.exists(f"{root}/{MARKER}"):
        return None
    return json.loads(fs.cat_file(f"{root}/{MARKER}"))["files"]


def read_published(url: str, rel: str) -> bytes:
    """One file of a published directory (small files: plans, markers)."""
    fs, root = _fs(url)
    return fs.cat_file(f"{root}/{rel}")


def fetch(url: str, local: str | Path) -> Path:
    """Copy a published directory to `local`, each file checked against the marker before use."""
    from memprobe.distributed.plan import file_sha256

    fs, root = _fs(url)
    files = published(url)
    if files is None:
        raise MemprobeError(f"{url} is not completely published (no {MARKER}); re-run the job that writes it")
    local = Path(local)
    for rel, expected in files.items():
        with atomic_path(local / rel) as tmp:  # a failed or damaged download leaves no file behind
            fs.get_file(f"{root}/{rel}", str(tmp))
            if tmp.stat().st_size != expected["bytes"] or file_sha256(tmp) != expected["sha256"]:
                raise MemprobeError(f"{url}/{rel} does not match its completion marker (damaged); re-run the job")
    return local
