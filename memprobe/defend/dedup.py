"""Deduplicate training documents: exact copies and near-duplicates (MinHash LSH).

Why both: a lab member with `copies: k` is shown k times per epoch (exact copies), and two distinct
documents can be near-copies (estimated Jaccard of word shingles >= threshold); Kandpal et al. 2022
and Lee et al. 2022 tie memorization to both. Exact copies collapse to one (`copies` 1); of each
near-duplicate cluster the first document by id is kept. The lab's own MinHash signature
(`memprobe.lab.corpus.minhash`) is used, so the lab's near-duplicate report and this agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memprobe.errors import MemprobeError


def deduplicate(
    docs: Sequence[dict[str, Any]], *, near: bool = True, threshold: float | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(deduplicated documents, report). Identical texts merge into the first by id; `copies`
    becomes 1; with `near`, of every cluster of near-duplicates only the first by id stays."""
    from datasketch import MinHashLSH

    from memprobe.lab.corpus import NEAR_DUP_THRESHOLD, NUM_PERM, minhash

    threshold = NEAR_DUP_THRESHOLD if threshold is None else threshold
    if not 0.0 < threshold <= 1.0:
        raise MemprobeError(f"threshold={threshold}: give an estimated Jaccard in (0, 1]")
    ordered = sorted(docs, key=lambda d: d["id"])
    seen_text: dict[str, str] = {}
    kept: list[dict[str, Any]] = []
    exact_removed = copies_removed = 0
    for doc in ordered:
        if doc["text"] in seen_text:
            exact_removed += 1
            continue
        copies_removed += int(doc.get("copies", 1)) - 1
        seen_text[doc["text"]] = doc["id"]
        kept.append({**doc, "copies": 1})
    near_removed: list[list[str]] = []
    if near:
        lsh, hashes, survivors = MinHashLSH(threshold=threshold, num_perm=NUM_PERM), {}, []
        for doc in kept:
            m = minhash(doc["text"])
            close = [k for k in lsh.query(m) if hashes[k].jaccard(m) >= threshold]
            if close:
                near_removed.append([doc["id"], min(close)])
                continue
            lsh.insert(doc["id"], m)
            hashes[doc["id"]] = m
            survivors.append(doc)
        kept = survivors
    report = {
        "method": "exact text match, then datasketch MinHash LSH (memprobe.lab.corpus.minhash) "
        f"with estimated Jaccard >= {threshold}",
        "documents_in": len(ordered),
        "documents_out": len(kept),
        "presentations_in": sum(int(d.get("copies", 1)) for d in ordered),
        "presentations_out": len(kept),
        "repeat_copies_removed": copies_removed,
        "identical_documents_removed": exact_removed,
        "near_duplicates_removed": [{"id": a, "near_copy_of": b} for a, b in near_removed],
    }
    return kept, report
