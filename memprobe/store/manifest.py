"""The manifest: what a capture is (config, sites, widths, dtype, documents) and which shards hold it.

The planned manifest of a capture is compared with the one on disk before resuming, so a re-run with
different arguments is refused instead of mixing two captures in one store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memprobe.errors import MemprobeError
from memprobe.store.format import FORMAT, FORMAT_VERSION, MANIFEST, torch_dtype


def _normalised(value: Any, what: str) -> Any:
    """`value` as it will read back from JSON (tuples become lists, ...), or a clear error."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise MemprobeError(
            f"{what} must be JSON-serialisable (plain dicts, lists, str, numbers): {exc}"
        ) from exc


def load_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.is_dir():
        raise MemprobeError(
            f"activation store {path} does not exist (or is not a directory); run `memprobe capture --out {path}` first"
        )
    if not file.is_file():
        raise MemprobeError(
            f"no {MANIFEST} in {path}: not a memprobe activation store; run `memprobe capture --out {path}` to make one"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemprobeError(
            f"{file} is unreadable or corrupt ({exc}); re-run the capture with --overwrite"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MemprobeError(
            f"{file} is not a memprobe activation-store manifest; choose another directory"
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise MemprobeError(
            f"{path} was written by a newer memprobe (store format {manifest['format_version']}, "
            f"this one reads {FORMAT_VERSION}); upgrade memprobe"
        )
    return manifest


def column_kinds(columns: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: str(tensor.dtype).removeprefix("torch.") for name, tensor in columns.items()}


def planned_manifest(
    config: dict[str, Any],
    sites: list[str],
    widths: dict[str, int],
    dtype: str,
    documents: list[dict[str, Any]],
) -> dict[str, Any]:
    from memprobe import __version__

    torch_dtype(dtype)
    sites = list(sites)
    if (
        not sites
        or len(set(sites)) != len(sites)
        or not all(isinstance(s, str) and s for s in sites)
    ):
        raise MemprobeError(f"sites must be a non-empty list of distinct names, got {sites}")
    reserved = [s for s in sites if s.startswith("__")]
    if reserved:
        raise MemprobeError(
            f"site names may not start with '__' (reserved for row data): {reserved}"
        )
    if set(widths) != set(sites) or not all(
        isinstance(widths[s], int) and widths[s] > 0 for s in sites
    ):
        raise MemprobeError(
            f"widths must give a positive int for each site and nothing else; sites {sites}, widths {widths}"
        )
    seen: set[str] = set()
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise MemprobeError(f"document {i} needs a string 'id'")
        n = doc.get("n_tokens")
        if not isinstance(n, int) or n < 0:
            raise MemprobeError(
                f"document {doc['id']!r} needs 'n_tokens', a non-negative int, got {n!r}"
            )
        if doc["id"] in seen:
            raise MemprobeError(
                f"duplicate document id {doc['id']!r}; ids must be unique in the input"
            )
        seen.add(doc["id"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memprobe_version": __version__,
        "config": _normalised(config, "config"),
        "sites": sites,
        "widths": {s: widths[s] for s in sites},
        "dtype": dtype,
        "documents": _normalised(list(documents), "documents"),
        "shards": [],
        "n_rows": 0,
        "complete": False,
    }


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between the capture on disk and the one asked for."""
    found: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{where}.{key}")
        elif where == "documents" and isinstance(a, list) and isinstance(b, list):
            first = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
            found.append(
                f"documents differ from #{first} ({len(a)} in the store, {len(b)} asked for)"
            )
        else:
            found.append(f"{where}: {_short(a)} in the store, {_short(b)} asked for")

    for key in ("format_version", "config", "sites", "widths", "dtype", "documents"):
        walk(old.get(key), new.get(key), key)
    return found[:5]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
