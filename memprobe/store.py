"""ActivationStore: activations on disk as checksummed safetensors shards plus a JSON manifest.

Why this shape: a capture can be far larger than memory, runs for a long time and may be killed.
So the writer commits one shard of whole documents at a time (temp file, fsync, rename, then an
atomic manifest update): the manifest only ever names complete shards, memory is bounded by one
batch, and a rerun with the same arguments resumes from the last committed shard. Readers map
shards lazily and verify checksums before trusting any bytes.

Layout of a store directory::

    manifest.json               what was captured (config, sites, documents) and the shard list
    shard-00000.safetensors     one tensor per site, (rows, width), plus per-row tensors
    shard-00001.safetensors     ...

Per-row data (document index, position, token id, label columns) lives in the shards, not in the
manifest: the manifest is rewritten at every commit and must stay small.
"""

from __future__ import annotations

import bisect
import difflib
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xxhash
from safetensors import safe_open

from memprobe.errors import MemprobeError

FORMAT = "memprobe-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ROW_FIELDS = ("doc_index", "position", "token_id")
_ROW_PREFIX = "__row__."
_COLUMN_PREFIX = "__column__."
_HEADER = "__header__"  # pseudo tensor name for the checksum of a shard's header
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_DISK_MARGIN = 1.1
_CHUNK = 1 << 22

# Parts of shards already checked in this process: (file, size, mtime_ns, inode, tensor name).
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


class Row(NamedTuple):
    """One captured token: which document, where in it (as the model saw it), which token."""

    doc_id: str
    position: int
    token_id: int


# --------------------------------------------------------------------------------------------
# Small file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is already done
    finally:
        os.close(fd)


def _durable_write(path: Path, data: bytes | Sequence[bytes | memoryview], *, drop_cache: bool = False) -> None:
    """Write `data` (bytes, or buffers written back to back) to `path` via `path.tmp` + fsync + rename:
    readers see all of it or none.

    `drop_cache` tells the kernel to drop the file's pages once they are on disk: a capture never
    reads its shards back, and gigabytes of them left in the page cache make the kernel reclaim memory
    in the middle of later forward passes (float32 capture measured 5-15% faster with it).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in [data] if isinstance(data, bytes) else data:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view[:_CHUNK]) :]
            os.fsync(fd)
            if drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def _digest(data: bytes | memoryview, algorithm: str = CHECKSUM) -> str:
    h = _hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def _file_digest(path: Path, algorithm: str, start: int = 0, stop: int | None = None) -> str:
    digest = _hasher(algorithm)
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = None if stop is None else stop - start
        while remaining is None or remaining > 0:
            chunk = handle.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}


def _safetensors_parts(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[str, memoryview]]]:
    """A safetensors file as its header plus one zero-copy buffer per tensor (sorted by name).

    Why not `safetensors.torch.save`: it copies every byte into one Python bytes object, which costs
    as much as the write itself for the hundreds of MB a shard holds. The layout is the format's own
    (u64 header length, JSON header padded with spaces to 8 bytes, tensors back to back), so
    `safe_open` reads it like any other file.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    parts, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        parts.append((name, view))
        offset += view.nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, parts


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()


def _normalised(value: Any, what: str) -> Any:
    """`value` as it will read back from JSON (tuples become lists, ...), or a clear error."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise MemprobeError(
            f"{what} must be JSON-serialisable (plain dicts, lists, str, numbers): {exc}"
        ) from exc


def _load_manifest(path: Path) -> dict[str, Any]:
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


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=_torch_dtype(dtype)).element_size()


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MemprobeError(f"unsupported store dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _closest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.4) or list(choices[:3])
    return ", ".join(close)


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def check_free_disk(path: str | Path, n_bytes: int) -> None:
    """Refuse before writing when the filesystem holding `path` has less than 1.1x `n_bytes` free."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < _DISK_MARGIN * n_bytes:
        raise MemprobeError(
            f"not enough free disk for {path}: the capture needs about {_mb(n_bytes)} "
            f"(+10% margin) but only {_mb(free)} is free; free space, choose another --out, "
            "capture fewer sites, or use --dtype bfloat16"
        )


# --------------------------------------------------------------------------------------------
# Writing


class StoreWriter:
    """Write a capture shard by shard; reopening the same directory with the same capture resumes.

    `config` identifies the capture (model name and sha256, quantization, backend, tokenizer
    settings, input hash, ...). `documents` is the full planned list, each with a unique `id` and
    `n_tokens` (rows the model sees, BOS included); other fields (kind, label) are kept as is.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        config: dict[str, Any],
        sites: list[str],
        widths: dict[str, int],
        dtype: str,
        documents: list[dict[str, Any]],
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        planned = _planned_manifest(config, sites, widths, dtype, documents)
        if self.path.exists() and not self.path.is_dir():
            raise MemprobeError(
                f"--out {self.path} is a file, not a directory; choose another --out"
            )
        if overwrite:
            _remove_store_files(self.path)
        if (self.path / MANIFEST).exists():
            self._manifest = self._resume(planned)
        else:
            leftovers = (
                [p.name for p in self.path.glob("*") if not p.name.endswith(".tmp")]
                if self.path.is_dir()
                else []
            )
            if leftovers and not overwrite:
                raise MemprobeError(
                    f"--out {self.path} is not empty and holds no activation store "
                    f"({', '.join(sorted(leftovers)[:3])}, ...); choose an empty directory or pass --overwrite"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            for stray in self.path.glob("*.tmp"):
                stray.unlink()
            self._manifest = planned
            _durable_write(self.path / MANIFEST, _json_bytes(planned))
        self._done = {i for shard in self._manifest["shards"] for i in shard["documents"]}
        pending_rows = sum(self._manifest["documents"][i]["n_tokens"] for i in self.pending())
        check_free_disk(self.path, self.estimate_bytes(pending_rows, self.widths, self.dtype))

    # -- public -----------------------------------------------------------------------------

    @property
    def sites(self) -> list[str]:
        return list(self._manifest["sites"])

    @property
    def widths(self) -> dict[str, int]:
        return dict(self._manifest["widths"])

    @property
    def dtype(self) -> str:
        return self._manifest["dtype"]

    @property
    def n_rows(self) -> int:
        return self._manifest["n_rows"]

    def pending(self) -> list[int]:
        """Indices (into `documents`) of documents not yet in a committed shard, in plan order."""
        return [i for i in range(len(self._manifest["documents"])) if i not in self._done]

    @staticmethod
    def estimate_bytes(n_rows: int, widths: dict[str, int], dtype: str) -> int:
        """Bytes that `n_rows` rows of these sites take on disk (activations + per-row data)."""
        return n_rows * (sum(widths.values()) * _itemsize(dtype) + 8 * len(ROW_FIELDS))

    def write_shard(
        self,
        doc_indices: list[int],
        activations: dict[str, torch.Tensor],
        doc_index: torch.Tensor,
        position: torch.Tensor,
        token_id: torch.Tensor,
        columns: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Commit the rows of whole documents `doc_indices` as one shard; returns its manifest entry.

        Rows may come in any order: they are stored grouped by document (in `doc_indices` order)
        and by position, so each document's rows are one contiguous range.
        """
        doc_indices = self._check_doc_indices(doc_indices)
        n_rows = self._check_row_fields(doc_index, position, token_id)
        order = self._canonical_order(doc_indices, doc_index.long().cpu(), position.long().cpu())
        tensors = self._check_activations(activations, n_rows)
        label_columns = self._check_columns(columns, n_rows)
        tensors.update({_COLUMN_PREFIX + k: v for k, v in label_columns.items()})
        tensors.update(
            {
                _ROW_PREFIX + k: v.long().cpu()
                for k, v in zip(ROW_FIELDS, (doc_index, position, token_id), strict=True)
            }
        )
        if order is not None:
            tensors = {k: v.index_select(0, order) for k, v in tensors.items()}
        tensors = {k: v.contiguous() for k, v in tensors.items()}

        number = max((_shard_number(s["file"]) for s in self._manifest["shards"]), default=-1) + 1
        file = f"shard-{number:05d}.safetensors"
        ids = [self._manifest["documents"][i]["id"] for i in doc_indices]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype,
            "documents": ids,
        }
        header, parts = _safetensors_parts(tensors, {"memprobe": json.dumps(meta, sort_keys=True)})
        entry = {
            "file": file,
            "bytes": len(header) + sum(view.nbytes for _, view in parts),
            "row_start": self.n_rows,
            "row_stop": self.n_rows + n_rows,
            "documents": doc_indices,
            "checksum": CHECKSUM,
            "tensors": {_HEADER: _digest(header)} | {name: _digest(view) for name, view in parts},
        }
        manifest = dict(
            self._manifest, shards=[*self._manifest["shards"], entry], n_rows=self.n_rows + n_rows
        )
        manifest.setdefault("columns", _column_kinds(label_columns))  # the first shard fixes them
        try:
            _durable_write(self.path / file, [header, *(view for _, view in parts)], drop_cache=True)
            _durable_write(self.path / MANIFEST, _json_bytes(manifest))
        except OSError as exc:
            (self.path / file).unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MemprobeError(
                    f"disk full while writing shard {file} of {self.path}; free {_mb(entry['bytes'])} "
                    "or more (or choose another --out); the capture resumes from the last complete shard"
                ) from exc
            raise MemprobeError(
                f"could not write shard {file} of {self.path} ({exc}); fix the cause and re-run: "
                "the capture resumes from the last complete shard"
            ) from exc
        self._manifest = manifest
        self._done.update(doc_indices)
        return entry

    def finish(self) -> None:
        """Mark the store complete; refuses while documents are still pending."""
        missing = self.pending()
        if missing:
            first = self._manifest["documents"][missing[0]]["id"]
            raise MemprobeError(
                f"cannot finish {self.path}: {len(missing)} documents not written yet (first: {first!r})"
            )
        if not self._manifest["complete"]:
            self._manifest = dict(self._manifest, complete=True)
            _durable_write(self.path / MANIFEST, _json_bytes(self._manifest))

    # -- resume -----------------------------------------------------------------------------

    def _resume(self, planned: dict[str, Any]) -> dict[str, Any]:
        try:
            manifest = _load_manifest(self.path)
        except MemprobeError as exc:
            raise MemprobeError(
                f"{exc}; or choose another --out, or pass --overwrite to replace it"
            ) from exc
        differences = _differences(manifest, planned)
        if differences:
            raise MemprobeError(
                f"--out {self.path} holds a different capture ({'; '.join(differences)}); "
                "choose another --out, or pass --overwrite to replace it"
            )
        return self._recover(manifest)

    def _recover(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Drop leftovers of a killed run: temp files, uncommitted shards, damaged shards."""
        for stray in self.path.glob("*.tmp"):
            stray.unlink()
        committed = {s["file"] for s in manifest["shards"]}
        for file in self.path.glob("shard-*.safetensors"):
            if file.name not in committed:
                file.unlink()  # renamed into place but killed before the manifest named it
        kept, row = [], 0
        for shard in manifest["shards"]:
            file = self.path / shard["file"]
            if not _shard_intact(file, shard):
                warnings.warn(
                    f"{file} is missing or damaged; its documents will be captured again",
                    stacklevel=3,
                )
                file.unlink(missing_ok=True)
                continue
            n = shard["row_stop"] - shard["row_start"]
            kept.append(dict(shard, row_start=row, row_stop=row + n))
            row += n
        if kept != manifest["shards"]:
            manifest = dict(manifest, shards=kept, n_rows=row, complete=False)
            _durable_write(self.path / MANIFEST, _json_bytes(manifest))
        return manifest

    # -- validation -------------------------------------------------------------------------

    def _check_doc_indices(self, doc_indices: list[int]) -> list[int]:
        documents = self._manifest["documents"]
        indices = [int(i) for i in doc_indices]
        if not indices:
            raise MemprobeError("write_shard needs at least one document")
        if len(set(indices)) != len(indices):
            raise MemprobeError(f"write_shard got a document twice in doc_indices: {indices}")
        for i in indices:
            if not 0 <= i < len(documents):
                raise MemprobeError(
                    f"document index {i} is out of range (the capture plans {len(documents)} documents)"
                )
            if i in self._done:
                raise MemprobeError(
                    f"document {documents[i]['id']!r} is already in a committed shard; write each document once (see pending())"
                )
        return indices

    @staticmethod
    def _check_row_fields(
        doc_index: torch.Tensor, position: torch.Tensor, token_id: torch.Tensor
    ) -> int:
        n_rows = doc_index.shape[0] if doc_index.dim() == 1 else -1
        for name, tensor in zip(ROW_FIELDS, (doc_index, position, token_id), strict=True):
            if tensor.dim() != 1 or tensor.shape[0] != n_rows or tensor.is_floating_point():
                raise MemprobeError(
                    f"write_shard: {name} must be a 1-D integer tensor with one entry per row "
                    f"({n_rows} rows from doc_index), got shape {tuple(tensor.shape)} {tensor.dtype}"
                )
        return n_rows

    def _canonical_order(
        self, doc_indices: list[int], doc_index: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor | None:
        """Check rows are exactly positions 0..n_tokens-1 of each document; the sort to apply, if any."""
        documents = self._manifest["documents"]
        lengths = [documents[i]["n_tokens"] for i in doc_indices]
        rank = torch.full((len(documents),), -1, dtype=torch.long)
        rank[torch.tensor(doc_indices)] = torch.arange(len(doc_indices))
        if doc_index.numel() and (
            doc_index.min() < 0 or doc_index.max() >= len(documents) or (rank[doc_index] < 0).any()
        ):
            stray = sorted(set(doc_index.tolist()) - set(doc_indices))[:3]
            raise MemprobeError(
                f"write_shard: rows belong to documents {stray} that are not in doc_indices {doc_indices[:5]}"
            )
        stride = max(lengths, default=0) + 1
        key = rank[doc_index] * stride + position if doc_index.numel() else doc_index
        expected = (
            torch.cat([r * stride + torch.arange(n) for r, n in enumerate(lengths)])
            if lengths
            else key
        )
        sorted_key, order = torch.sort(key, stable=True)
        if sorted_key.shape != expected.shape or not torch.equal(sorted_key, expected):
            counts = (
                torch.bincount(rank[doc_index], minlength=len(doc_indices)).tolist()
                if doc_index.numel()
                else [0] * len(lengths)
            )
            for i, count, n in zip(doc_indices, counts, lengths, strict=True):
                if count != n:
                    raise MemprobeError(
                        f"write_shard: document {documents[i]['id']!r} has {count} rows but n_tokens={n}; pass every token of a document in one shard"
                    )
            raise MemprobeError(
                "write_shard: positions of a document must be exactly 0..n_tokens-1, each once"
            )
        if torch.equal(order, torch.arange(len(order))):
            return None
        return order

    def _check_activations(
        self, activations: dict[str, torch.Tensor], n_rows: int
    ) -> dict[str, torch.Tensor]:
        sites = self._manifest["sites"]
        if set(activations) != set(sites):
            missing, extra = (
                sorted(set(sites) - set(activations)),
                sorted(set(activations) - set(sites)),
            )
            raise MemprobeError(
                f"write_shard: activations must hold exactly the store's sites (missing {missing}, unexpected {extra})"
            )
        out = {}
        dtype = _torch_dtype(self.dtype)
        for site in sites:
            tensor = activations[site]
            width = self._manifest["widths"][site]
            if tuple(tensor.shape) != (n_rows, width):
                raise MemprobeError(
                    f"write_shard: site {site!r} has shape {tuple(tensor.shape)}, expected ({n_rows}, {width}) (rows, width)"
                )
            out[site] = tensor.detach().to("cpu", dtype)
        return out

    def _check_columns(
        self, columns: dict[str, torch.Tensor] | None, n_rows: int
    ) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in (columns or {}).items():
            if not name or tensor.dim() != 1 or tensor.shape[0] != n_rows:
                raise MemprobeError(
                    f"write_shard: column {name!r} must be a 1-D tensor with {n_rows} entries, got shape {tuple(tensor.shape)}"
                )
            kind = (
                torch.bool
                if tensor.dtype == torch.bool
                else torch.float32
                if tensor.is_floating_point()
                else torch.int64
            )
            out[name] = tensor.detach().to("cpu", kind)
        expected = self._manifest.get("columns")
        if expected is not None:
            got = _column_kinds(out)
            if got != expected:
                raise MemprobeError(
                    f"write_shard: label columns {got} differ from the earlier shards' {expected}; pass the same columns to every shard"
                )
        return out


def _column_kinds(columns: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: str(tensor.dtype).removeprefix("torch.") for name, tensor in columns.items()}


def _shard_number(file: str) -> int:
    match = _SHARD_RE.match(file)
    return int(match.group(1)) if match else -1


def _planned_manifest(
    config: dict[str, Any],
    sites: list[str],
    widths: dict[str, int],
    dtype: str,
    documents: list[dict[str, Any]],
) -> dict[str, Any]:
    from memprobe import __version__

    _torch_dtype(dtype)
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


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
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


def _remove_store_files(path: Path) -> None:
    """Delete what a store owns (manifest first, so no manifest ever names a missing shard)."""
    if not path.is_dir():
        return
    (path / MANIFEST).unlink(missing_ok=True)
    for file in [*path.glob("shard-*.safetensors"), *path.glob("*.tmp")]:
        file.unlink()


# --------------------------------------------------------------------------------------------
# Reading


class RowTable:
    """What each row is: columnar tensors plus `rows[i] -> Row(doc_id, position, token_id)`."""

    def __init__(
        self,
        doc_ids: list[str],
        doc_index: torch.Tensor,
        position: torch.Tensor,
        token_id: torch.Tensor,
    ) -> None:
        self._doc_ids = doc_ids
        self.doc_index = doc_index
        self.position = position
        self.token_id = token_id

    def __len__(self) -> int:
        return len(self.doc_index)

    def __getitem__(self, i: int) -> Row:
        i = range(len(self))[i]
        return Row(
            self._doc_ids[int(self.doc_index[i])], int(self.position[i]), int(self.token_id[i])
        )

    def __iter__(self) -> Iterator[Row]:
        for d, p, t in zip(
            self.doc_index.tolist(), self.position.tolist(), self.token_id.tolist(), strict=True
        ):
            yield Row(self._doc_ids[d], p, t)

    @cached_property
    def doc_id(self) -> list[str]:
        return [self._doc_ids[d] for d in self.doc_index.tolist()]


class ActivationStore:
    """Read a store lazily: only the shards (and tensors) a read touches are mapped and verified."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._starts = [s["row_start"] for s in manifest["shards"]]

    @classmethod
    def open(cls, path: str | Path) -> ActivationStore:
        """Open the store at `path`; checks that every committed shard is present and whole."""
        path = Path(path)
        manifest = _load_manifest(path)
        for shard in manifest["shards"]:
            file = path / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != shard["bytes"]:
                state = (
                    "is missing"
                    if size is None
                    else f"is truncated or damaged ({size} of {shard['bytes']} bytes)"
                )
                raise MemprobeError(
                    f"shard {file} {state}; re-run the capture with the same arguments: it resumes and rewrites the shard"
                )
        store = cls(path, manifest)
        if not store.complete:
            warnings.warn(
                f"activation store {path} is incomplete ({len(store)} rows committed); re-run the capture to finish it",
                stacklevel=2,
            )
        return store

    def __repr__(self) -> str:
        state = "" if self.complete else ", incomplete"
        return f"ActivationStore({str(self.path)!r}, {len(self)} rows, {len(self.sites)} sites, {self.dtype}{state})"

    def __len__(self) -> int:
        return self.manifest["n_rows"]

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def widths(self) -> dict[str, int]:
        return dict(self.manifest["widths"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def documents(self) -> list[dict[str, Any]]:
        return self.manifest["documents"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def columns(self) -> list[str]:
        return list(self.manifest.get("columns", {}))

    def read(
        self,
        site: str,
        start: int = 0,
        stop: int | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> torch.Tensor:
        """Rows `start:stop` of `site` as a (rows, width) tensor, reading only overlapping shards."""
        if site not in self.manifest["sites"]:
            raise MemprobeError(
                f"unknown site {site!r} in store {self.path}; closest: {_closest(site, self.sites)} "
                f"(the store has {len(self.sites)} sites, see store.sites)"
            )
        out = self._read(site, start, stop, (self.widths[site],), _torch_dtype(self.dtype))
        return out if dtype is None else out.to(_torch_dtype(dtype))

    def iter_batches(
        self, sites: str | Sequence[str] | None = None, batch_rows: int = 4096
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (row_start, {site: rows}) over the whole store; memory is bounded by one batch."""
        sites = self.sites if sites is None else [sites] if isinstance(sites, str) else list(sites)
        if batch_rows < 1:
            raise MemprobeError(f"batch_rows must be positive, got {batch_rows}")
        for start in range(0, len(self), batch_rows):
            stop = min(start + batch_rows, len(self))
            yield start, {site: self.read(site, start, stop) for site in sites}

    @cached_property
    def rows(self) -> RowTable:
        """Document id, position and token id of every row (small: three ints per row)."""
        fields = [self._read(_ROW_PREFIX + name, 0, None, (), torch.int64) for name in ROW_FIELDS]
        return RowTable([d["id"] for d in self.documents], *fields)

    def column(self, name: str) -> torch.Tensor:
        """A per-row label column written by the capture (e.g. `target_prob`, `memorized`)."""
        kinds = self.manifest.get("columns", {})
        if name not in kinds:
            raise MemprobeError(
                f"no label column {name!r} in store {self.path}; it has: {', '.join(kinds) or 'none'}"
            )
        return self._read(_COLUMN_PREFIX + name, 0, None, (), getattr(torch, kinds[name]))

    def doc_rows(self, doc_id: str) -> slice:
        """The contiguous row range holding document `doc_id`."""
        if doc_id not in self._doc_slices:
            ids = [d["id"] for d in self.documents]
            if doc_id in ids:
                raise MemprobeError(
                    f"document {doc_id!r} is not captured yet in {self.path}; re-run the capture to finish it"
                )
            raise MemprobeError(
                f"unknown document id {doc_id!r} in store {self.path}; closest: {_closest(doc_id, ids)}"
            )
        return self._doc_slices[doc_id]

    def verify(self) -> None:
        """Check every byte of every shard against its checksums; raises MemprobeError naming the first bad one."""
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if not _shard_intact(file, shard):
                raise _corrupt(file)

    # -- internals --------------------------------------------------------------------------

    @cached_property
    def _doc_slices(self) -> dict[str, slice]:
        slices, documents = {}, self.documents
        for shard in self.manifest["shards"]:
            row = shard["row_start"]
            for i in shard["documents"]:
                n = documents[i]["n_tokens"]
                slices[documents[i]["id"]] = slice(row, row + n)
                row += n
        return slices

    def _read(
        self, name: str, start: int, stop: int | None, tail: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Rows `start:stop` of tensor `name` across shards; `tail` and `dtype` shape an empty result."""
        start, stop, _ = slice(start, stop).indices(len(self))
        shards = self.manifest["shards"]
        parts = []
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        for shard in shards[first:]:
            if shard["row_start"] >= stop:
                break
            a, b = max(start, shard["row_start"]), min(stop, shard["row_stop"])
            if a >= b:
                continue
            file = self.path / shard["file"]
            _verify_part(file, shard, name)
            try:
                with safe_open(file, framework="pt") as handle:
                    parts.append(
                        handle.get_slice(name)[a - shard["row_start"] : b - shard["row_start"]]
                    )
            except Exception as exc:  # safetensors raises its own error types on malformed files
                raise _corrupt(file) from exc
        if not parts:
            return torch.empty((0, *tail), dtype=dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

def _verify_part(file: Path, shard: dict[str, Any], name: str) -> None:
    """Check the header and tensor `name` of a shard against the manifest, once per process."""
    try:
        stat = file.stat()
    except OSError as exc:
        raise _corrupt(file) from exc
    base = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if (*base, name) in _VERIFIED:
        return
    sums = shard["tensors"]
    if stat.st_size != shard["bytes"]:
        raise _corrupt(file)
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if not 0 < header_len < stat.st_size:
            raise _corrupt(file)
    algorithm = shard.get("checksum", "sha256")  # stores from before xxh3 carry sha256 sums
    if _file_digest(file, algorithm, 0, 8 + header_len) != sums[_HEADER]:
        raise _corrupt(file)
    with open(file, "rb") as handle:
        handle.seek(8)
        info = json.loads(handle.read(header_len)).get(name)
    if info is None:
        raise _corrupt(file)
    begin, end = (8 + header_len + offset for offset in info["data_offsets"])
    if _file_digest(file, algorithm, begin, end) != sums[name]:
        raise _corrupt(file)
    _VERIFIED.add((*base, name))


def _shard_intact(file: Path, shard: dict[str, Any]) -> bool:
    """Whether the whole shard file matches its manifest entry: header and every tensor checksum.

    The header and the tensors cover every byte of the file, so this checks all of it. Stores written
    before per-part sums were the only sums also carry a whole-file "sha256", checked when present.
    """
    try:
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            return False
        if "sha256" in shard:
            return _file_digest(file, "sha256") == shard["sha256"]
        for name in shard["tensors"]:
            if name != _HEADER:
                _verify_part(file, shard, name)
    except MemprobeError:
        return False
    return True


def _corrupt(file: Path) -> MemprobeError:
    return MemprobeError(
        f"shard {file} is corrupt (checksum mismatch); its data was not used. Delete the store and "
        "re-run the capture, or re-run it with the same arguments: a resumed capture checks every "
        "shard and rewrites damaged ones"
    )
