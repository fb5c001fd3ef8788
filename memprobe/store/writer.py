"""StoreWriter: commit a capture shard by shard, and resume a killed one from its last shard.

Why this shape: a capture can be far larger than memory, runs for a long time and may be killed.
So the writer commits one shard of whole documents at a time (atomic shard write, then an atomic
manifest update): the manifest only ever names complete shards, memory is bounded by one batch, and
a rerun with the same arguments resumes from the last committed shard.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from memprobe.errors import MemprobeError
from memprobe.io.atomic import atomic_write
from memprobe.store.format import (
    COLUMN_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    HEADER_PART,
    MANIFEST,
    ROW_FIELDS,
    ROW_PREFIX,
    itemsize,
    json_bytes,
    safetensors_parts,
    shard_number,
    torch_dtype,
)
from memprobe.store.integrity import CHECKSUM, digest, shard_intact
from memprobe.store.manifest import (
    column_kinds,
    load_manifest,
    manifest_differences,
    planned_manifest,
)

_DISK_MARGIN = 1.1


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
        planned = planned_manifest(config, sites, widths, dtype, documents)
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
            atomic_write(self.path / MANIFEST, json_bytes(planned))
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
        return n_rows * (sum(widths.values()) * itemsize(dtype) + 8 * len(ROW_FIELDS))

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
        tensors.update({COLUMN_PREFIX + k: v for k, v in label_columns.items()})
        tensors.update(
            {
                ROW_PREFIX + k: v.long().cpu()
                for k, v in zip(ROW_FIELDS, (doc_index, position, token_id), strict=True)
            }
        )
        if order is not None:
            tensors = {k: v.index_select(0, order) for k, v in tensors.items()}
        tensors = {k: v.contiguous() for k, v in tensors.items()}

        number = max((shard_number(s["file"]) for s in self._manifest["shards"]), default=-1) + 1
        file = f"shard-{number:05d}.safetensors"
        ids = [self._manifest["documents"][i]["id"] for i in doc_indices]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype,
            "documents": ids,
        }
        header, parts = safetensors_parts(tensors, {"memprobe": json.dumps(meta, sort_keys=True)})
        entry = {
            "file": file,
            "bytes": len(header) + sum(view.nbytes for _, view in parts),
            "row_start": self.n_rows,
            "row_stop": self.n_rows + n_rows,
            "documents": doc_indices,
            "checksum": CHECKSUM,
            "tensors": {HEADER_PART: digest(header)} | {name: digest(view) for name, view in parts},
        }
        manifest = dict(
            self._manifest, shards=[*self._manifest["shards"], entry], n_rows=self.n_rows + n_rows
        )
        manifest.setdefault("columns", column_kinds(label_columns))  # the first shard fixes them
        try:
            atomic_write(self.path / file, [header, *(view for _, view in parts)], drop_cache=True)
            atomic_write(self.path / MANIFEST, json_bytes(manifest))
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
            atomic_write(self.path / MANIFEST, json_bytes(self._manifest))

    # -- resume -----------------------------------------------------------------------------

    def _resume(self, planned: dict[str, Any]) -> dict[str, Any]:
        try:
            manifest = load_manifest(self.path)
        except MemprobeError as exc:
            raise MemprobeError(
                f"{exc}; or choose another --out, or pass --overwrite to replace it"
            ) from exc
        differences = manifest_differences(manifest, planned)
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
            if not shard_intact(file, shard):
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
            atomic_write(self.path / MANIFEST, json_bytes(manifest))
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
        dtype = torch_dtype(self.dtype)
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
            got = column_kinds(out)
            if got != expected:
                raise MemprobeError(
                    f"write_shard: label columns {got} differ from the earlier shards' {expected}; pass the same columns to every shard"
                )
        return out


def _remove_store_files(path: Path) -> None:
    """Delete what a store owns (manifest first, so no manifest ever names a missing shard)."""
    if not path.is_dir():
        return
    (path / MANIFEST).unlink(missing_ok=True)
    for file in [*path.glob("shard-*.safetensors"), *path.glob("*.tmp")]:
        file.unlink()
