"""Reading a store: lazily, one shard and one tensor at a time, verified before any byte is trusted."""

from __future__ import annotations

import bisect
import difflib
import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from memprobe.errors import MemprobeError
from memprobe.store.format import COLUMN_PREFIX, ROW_FIELDS, ROW_PREFIX, torch_dtype
from memprobe.store.integrity import corrupt_error, shard_intact, verify_part
from memprobe.store.manifest import load_manifest


class Row(NamedTuple):
    """One captured token: which document, where in it (as the model saw it), which token."""

    doc_id: str
    position: int
    token_id: int


def _closest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.4) or list(choices[:3])
    return ", ".join(close)


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
        manifest = load_manifest(path)
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
        out = self._read(site, start, stop, (self.widths[site],), torch_dtype(self.dtype))
        return out if dtype is None else out.to(torch_dtype(dtype))

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
        fields = [self._read(ROW_PREFIX + name, 0, None, (), torch.int64) for name in ROW_FIELDS]
        return RowTable([d["id"] for d in self.documents], *fields)

    def column(self, name: str) -> torch.Tensor:
        """A per-row label column written by the capture (e.g. `target_prob`, `memorized`)."""
        kinds = self.manifest.get("columns", {})
        if name not in kinds:
            raise MemprobeError(
                f"no label column {name!r} in store {self.path}; it has: {', '.join(kinds) or 'none'}"
            )
        return self._read(COLUMN_PREFIX + name, 0, None, (), getattr(torch, kinds[name]))

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
            if not shard_intact(file, shard):
                raise corrupt_error(file)

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
            verify_part(file, shard, name)
            try:
                with safe_open(file, framework="pt") as handle:
                    parts.append(
                        handle.get_slice(name)[a - shard["row_start"] : b - shard["row_start"]]
                    )
            except Exception as exc:  # safetensors raises its own error types on malformed files
                raise corrupt_error(file) from exc
        if not parts:
            return torch.empty((0, *tail), dtype=dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)
