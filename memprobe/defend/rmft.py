"""RMFT (Joshi & Smith 2025, "Randomized Masked Fine-Tuning"): replace repeated PII values in the
fine-tuning data by random surrogates of the same type, so that no specific value repeats.

What could be confirmed: only the paper's abstract and introduction were reachable (arXiv
2512.03310 v1/v2 HTML, through the `search` tool); they say RMFT "reduces the number of times a
particular PII appears in the dataset while keeping the original PII intact". The method section
was not reachable, so this is OUR READING: the corpus is copied (the original stays intact); the
occurrences of each PII value (its `pii_spans` over all documents, in id order) keep the first one
as is, and a seeded-random `fraction` of the later ones (the repeats) is replaced by a fresh Faker
surrogate of the same type, each surrogate distinct from every other value. With fraction 1.0 every
value occurs once; with fraction f, a value with n repeats keeps n - round(f n) of them. The
replacement is static (drawn once, not per epoch); a document's `copies` are left to deduplication.
Text outside the spans is unchanged; spans are moved to the new character offsets.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from memprobe.errors import MemprobeError

FRACTIONS = (0.5, 1.0)


def _makers(fake: Any) -> dict[str, Callable[[], str]]:
    from datetime import date

    from memprobe.lab.corpus import _address

    return {
        "name": fake.name,
        "email": fake.email,
        "phone": fake.phone_number,
        "address": lambda: _address(fake),
        "ssn": fake.ssn,
        "credit_card": fake.credit_card_number,
        "dob": lambda: fake.date_between(date(1950, 1, 1), date(2003, 12, 31)).isoformat(),
    }


def rmft(
    docs: Sequence[dict[str, Any]], *, fraction: float = 1.0, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(new documents with repeats replaced, report); `docs` is left unchanged."""
    from faker import Faker

    from memprobe.lab.corpus import value_id

    if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise MemprobeError(
            f"fraction={fraction!r}: RMFT replaces a fraction in (0, 1] of each value's repeats "
            f"(the study uses {FRACTIONS})"
        )
    if not any(d.get("pii_spans") for d in docs):
        raise MemprobeError(
            "no document has `pii_spans` annotations: RMFT needs to know where each PII value is; "
            "build the corpus with `memprobe lab build` or add [start, end, type, value_id] spans"
        )
    ordered = sorted(docs, key=lambda d: d["id"])
    occurrences: dict[str, list[tuple[int, int]]] = defaultdict(list)  # value -> (doc, span)
    taken: set[str] = set()
    for i, doc in enumerate(ordered):
        for j, (start, end, _type, vid) in enumerate(doc.get("pii_spans") or []):
            occurrences[str(vid)].append((i, j))
            taken.add(doc["text"][start:end])
    fake = Faker("en_US")
    fake.seed_instance(seed)
    makers = _makers(fake)
    rng = random.Random(seed)
    replace: dict[tuple[int, int], str] = {}
    for vid in sorted(occurrences):
        repeats = occurrences[vid][1:]
        chosen = rng.sample(repeats, round(fraction * len(repeats))) if repeats else []
        for i, j in chosen:
            pii_type = ordered[i]["pii_spans"][j][2]
            if pii_type not in makers:
                raise MemprobeError(
                    f"document {ordered[i]['id']!r}: no surrogate for PII type {pii_type!r}; "
                    f"RMFT knows {', '.join(makers)}"
                )
            for _ in range(1000):
                value = makers[pii_type]()
                if value not in taken:
                    break
            else:
                raise MemprobeError(f"could not draw a fresh {pii_type} surrogate in 1000 tries")
            taken.add(value)
            replace[(i, j)] = value
    out = []
    for i, doc in enumerate(ordered):
        spans = sorted(enumerate(doc.get("pii_spans") or []), key=lambda s: s[1][0])
        pieces, new_spans, cursor, length = [], [], 0, 0
        for j, (start, end, pii_type, vid) in spans:
            if start < cursor:
                raise MemprobeError(f"document {doc['id']!r}: pii spans overlap at {start}")
            pieces.append(doc["text"][cursor:start])
            length += start - cursor
            value = replace.get((i, j), doc["text"][start:end])
            new_vid = value_id(pii_type, value) if (i, j) in replace else vid
            new_spans.append([length, length + len(value), pii_type, new_vid])
            pieces.append(value)
            length += len(value)
            cursor = end
        pieces.append(doc["text"][cursor:])
        out.append({**doc, "text": "".join(pieces), "pii_spans": new_spans})
    n_repeats = sum(len(v) - 1 for v in occurrences.values())
    report = {
        "method": "RMFT, our reading of Joshi & Smith 2025 (see memprobe.defend.rmft): first "
        "occurrence kept, a seeded fraction of repeats replaced by same-type Faker surrogates",
        "fraction": fraction,
        "seed": seed,
        "values": len(occurrences),
        "repeats": n_repeats,
        "replaced": len(replace),
        "max_occurrences_after": max_occurrences(out),
    }
    return out, report


def max_occurrences(docs: Sequence[dict[str, Any]]) -> int:
    """The largest number of span occurrences of any one PII value (value_id) over `docs`."""
    counts: dict[str, int] = defaultdict(int)
    for doc in docs:
        for span in doc.get("pii_spans") or []:
            counts[str(span[3])] += 1
    return max(counts.values(), default=0)
