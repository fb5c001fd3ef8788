"""Documents: the one validator and the one tokenization path, with one over-length policy.

Why one module: five readers checked `{"id", "text"}` documents with drifting rules (one allowed
empty ids, one silently cut long texts while capture refused them). Every reader now calls
`validate_documents` (ids unique non-empty strings, texts non-empty strings; errors name the
file:line when the documents came from a file, else the id or position) and every consumer that
needs token ids calls `tokenize_documents`: the model's own `LoadedModel.encode`, and a text longer
than the context is refused by id unless the caller passes `truncate=True`, which keeps the first
`context_length` tokens and records `truncated_from`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from memprobe.errors import MemprobeError


@dataclass(frozen=True)
class TokenizedDoc:
    """One document as the model sees it: its id, token ids and the fields it came with."""

    id: str
    token_ids: list[int]
    fields: dict[str, Any]


def validate_documents(
    docs: Sequence[Any], *, locations: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """`docs` unchanged when every one is a dict with a unique non-empty string `id` and a
    non-empty string `text`; else a MemprobeError at the first bad one.

    `locations[n]` (e.g. "members.jsonl:12") names where document n came from in the error.
    """
    first: dict[str, str] = {}
    for n, doc in enumerate(docs):
        where = locations[n] if locations is not None else None
        if not isinstance(doc, dict):
            raise MemprobeError(f"{where or f'document {n}'}: expected a JSON object with 'id' and "
                                f"'text', got {type(doc).__name__}")
        doc_id, text = doc.get("id"), doc.get("text")
        if not isinstance(doc_id, str) or not doc_id:
            problem = "'id' is empty" if doc_id == "" else "missing string field 'id'"
            raise MemprobeError(f"{where or f'document {n}'}: {problem}: every document needs a "
                                "unique non-empty string id")
        label = f"{where}: document {doc_id!r}" if where else f"document {doc_id!r}"
        if doc_id in first:
            before = first[doc_id]
            raise MemprobeError(
                f"{where}: duplicate id {doc_id!r} (first on line {before.rsplit(':', 1)[-1]}): "
                "ids must be unique" if where else
                f"document id {doc_id!r} appears twice (documents {before} and {n}): ids must be unique")
        first[doc_id] = where or str(n)
        if not isinstance(text, str):
            raise MemprobeError(f"{label}: missing string field 'text'")
        if not text.strip():
            raise MemprobeError(f"{label} has empty text: remove it or give it text")
    return list(docs)


def tokenize_documents(
    loaded: Any, docs: Sequence[dict[str, Any]], *, truncate: bool = False,
    max_tokens: int | None = None, locations: Sequence[str] | None = None,
) -> list[TokenizedDoc]:
    """Validate, then tokenise with the model's one tokenisation (`loaded.encode`).

    Texts longer than the limit (the context, or a smaller `max_tokens` budget) are refused by id
    (not chunked: positions would restart mid-document) unless `truncate`, which keeps the first
    `limit` tokens and records `truncated_from`.
    """
    validate_documents(docs, locations=locations)
    limit = loaded.context_length if max_tokens is None else min(int(max_tokens), loaded.context_length)
    if limit < 1:
        raise MemprobeError(f"max_tokens must be >= 1, got {max_tokens}")
    out = []
    for doc in docs:
        ids = loaded.encode(doc["text"])
        fields = {k: v for k, v in doc.items() if k not in ("id", "text")}
        if len(ids) > limit:
            if not truncate:
                what = f"{loaded.name}'s context" if limit == loaded.context_length else "max_tokens"
                raise MemprobeError(
                    f"document {doc['id']!r} is {len(ids)} tokens, longer than {what} of {limit}: "
                    "refused (memprobe refuses rather than chunk silently); split it into shorter "
                    f"documents, or pass truncate=True (--truncate) to keep its first {limit} tokens"
                )
            ids, fields = ids[:limit], {**fields, "truncated_from": len(ids)}
        out.append(TokenizedDoc(doc["id"], ids, fields))
    return out


def encode_documents(
    loaded: Any, docs: Sequence[dict[str, Any]], *, truncate: bool = False, max_tokens: int | None = None
) -> list[list[int]]:
    """Just the token ids of `tokenize_documents` (same validation, same over-length policy)."""
    return [d.token_ids for d in tokenize_documents(loaded, docs, truncate=truncate, max_tokens=max_tokens)]
