"""Merge the verified outputs of every plan entry into one ordinary output, in plan order.

Capture: the job directory becomes an ordinary activation store. Each entry's shards are verified,
hard-linked (copied where links are impossible) into the directory under their global shard
numbers, and the store manifest is written last, atomically: until then `open_store` refuses the
directory (no manifest), so nothing half-merged reads as valid. The manifest is the one a
single-process capture writes (same documents, shard entries, checksums), byte for byte.

Label and MIA: the entries' JSONL parts are concatenated in plan order (= input order) into one file,
written to a temp name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from memprobe.distributed.shard import PARTS, done_file, entry_done, part_dir, records_part
from memprobe.errors import MemprobeError
from memprobe.io import atomic_path, atomic_write, fsync_directory
from memprobe.store import MANIFEST, ActivationStore


def unfinished(job_dir: str | Path, plan: dict[str, Any]) -> list[int]:
    """Entries of `plan` without a verified output in `job_dir`, in plan order."""
    return [e["index"] for e in plan["entries"] if not entry_done(job_dir, plan, e["index"])]


def _place(source: Path, target: Path) -> None:
    """Put `source`'s bytes at `target` without ever exposing a partial file there: a hard link (no
    bytes copied) where the filesystem allows one, else a copy."""
    with atomic_path(target) as tmp:
        tmp.unlink()  # os.link needs a free name; the unique temp name stays this call's
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def merged_store(job_dir: str | Path, plan: dict[str, Any]) -> ActivationStore | None:
    """The merged store in `job_dir` if a merge of this plan already completed, else None."""
    job_dir = Path(job_dir)
    if not (job_dir / MANIFEST).is_file():
        return None
    store = ActivationStore.open(job_dir)
    if store.config != plan["settings"]["config"] or store.documents != plan["documents"] or not store.complete:
        raise MemprobeError(
            f"{job_dir} holds a different store than its plan.json describes; choose another --out, or "
            "delete the directory to start over"
        )
    return store


def merge_capture(job_dir: str | Path, plan: dict[str, Any]) -> ActivationStore:
    """Assemble every entry's shards into the store at `job_dir` (idempotent)."""
    job_dir = Path(job_dir)
    done = merged_store(job_dir, plan)
    if done is not None:
        return done
    _require_all_done(job_dir, plan)
    shards, row, header = [], 0, None
    for entry in plan["entries"]:
        part = part_dir(job_dir, entry["index"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # parts are never marked complete
            store = ActivationStore.open(part)
        store.verify()
        header = header or store.manifest
        for shard in store.manifest["shards"]:
            name = f"shard-{len(shards):05d}.safetensors"
            _place(part / shard["file"], job_dir / name)
            n = shard["row_stop"] - shard["row_start"]
            shards.append(dict(shard, file=name, row_start=row, row_stop=row + n))
            row += n
    manifest = dict(header, documents=plan["documents"], shards=shards, n_rows=row, complete=True)
    fsync_directory(job_dir)  # the linked shards are durable before the manifest names them
    atomic_write(job_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(job_dir / PARTS, ignore_errors=True)  # the store holds the same inodes now
    store = ActivationStore.open(job_dir)
    store.verify()
    return store


def merge_records(job_dir: str | Path, plan: dict[str, Any], output: str | Path) -> Path:
    """Concatenate the entries' JSONL records (label, mia), in plan order, into `output` (atomic)."""
    job_dir, output = Path(job_dir), Path(output)
    _require_all_done(job_dir, plan)
    output.parent.mkdir(parents=True, exist_ok=True)
    parts = (records_part(job_dir, e["index"]).read_bytes() for e in plan["entries"])
    return atomic_write(output, parts)


def _require_all_done(job_dir: Path, plan: dict[str, Any]) -> None:
    missing = unfinished(job_dir, plan)
    if missing:
        shown = ", ".join(str(i) for i in missing[:5])
        damaged = [i for i in missing if done_file(job_dir, i).exists()]
        why = f" ({len(damaged)} of them damaged or from another plan)" if damaged else ""
        raise MemprobeError(
            f"cannot merge {job_dir}: {len(missing)} of {len(plan['entries'])} plan entries are not finished "
            f"(entries {shown}{', ...' if len(missing) > 5 else ''}){why}; re-run the job: it computes only those"
        )
