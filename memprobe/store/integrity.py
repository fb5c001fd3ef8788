"""Shard checksums: one per part (the header and each tensor), so a read verifies only what it maps.

New shards carry xxh3_128 sums; stores written before it carry sha256 sums (per part, or one for the
whole file) and still verify.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import xxhash

from memprobe.errors import MemprobeError
from memprobe.store.format import HEADER_PART

_CHUNK = 1 << 22  # bytes read per call while hashing a file

# Parts of shards already checked in this process: (file, size, mtime_ns, inode, tensor name).
_VERIFIED: set[tuple[str, int, int, int, str]] = set()

CHECKSUM = "xxh3_128"  # per-part checksum of new shards; stores written with "sha256" still verify


def _hasher(algorithm: str):
    """A fresh hash object. Why xxh3_128: it checks a 500 MB shard in 0.04 s against sha256's 0.33 s,
    which would otherwise compete with the forward pass for the CPU; it detects corruption, which is
    what a shard checksum is for (it is not a defence against someone editing the file on purpose)."""
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise MemprobeError(f"unknown shard checksum {algorithm!r}: this store was written by another memprobe; upgrade it")


def digest(data: bytes | memoryview, algorithm: str = CHECKSUM) -> str:
    h = _hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def file_digest(path: Path, algorithm: str, start: int = 0, stop: int | None = None) -> str:
    hasher = _hasher(algorithm)
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = None if stop is None else stop - start
        while remaining is None or remaining > 0:
            chunk = handle.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                break
            hasher.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return hasher.hexdigest()


def verify_part(file: Path, shard: dict[str, Any], name: str) -> None:
    """Check the header and tensor `name` of a shard against the manifest, once per process."""
    try:
        stat = file.stat()
    except OSError as exc:
        raise corrupt_error(file) from exc
    base = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if (*base, name) in _VERIFIED:
        return
    sums = shard["tensors"]
    if stat.st_size != shard["bytes"]:
        raise corrupt_error(file)
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if not 0 < header_len < stat.st_size:
            raise corrupt_error(file)
    algorithm = shard.get("checksum", "sha256")  # stores from before xxh3 carry sha256 sums
    if file_digest(file, algorithm, 0, 8 + header_len) != sums[HEADER_PART]:
        raise corrupt_error(file)
    with open(file, "rb") as handle:
        handle.seek(8)
        info = json.loads(handle.read(header_len)).get(name)
    if info is None:
        raise corrupt_error(file)
    begin, end = (8 + header_len + offset for offset in info["data_offsets"])
    if file_digest(file, algorithm, begin, end) != sums[name]:
        raise corrupt_error(file)
    _VERIFIED.add((*base, name))


def shard_intact(file: Path, shard: dict[str, Any]) -> bool:
    """Whether the whole shard file matches its manifest entry: header and every tensor checksum.

    The header and the tensors cover every byte of the file, so this checks all of it. Stores written
    before per-part sums were the only sums also carry a whole-file "sha256", checked when present.
    """
    try:
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            return False
        if "sha256" in shard:
            return file_digest(file, "sha256") == shard["sha256"]
        for name in shard["tensors"]:
            if name != HEADER_PART:
                verify_part(file, shard, name)
    except MemprobeError:
        return False
    return True


def corrupt_error(file: Path) -> MemprobeError:
    return MemprobeError(
        f"shard {file} is corrupt (checksum mismatch); its data was not used. Delete the store and "
        "re-run the capture, or re-run it with the same arguments: a resumed capture checks every "
        "shard and rewrites damaged ones"
    )
