"""The probe studies' data: bundled corpus -> the model's own labels -> token set -> activation store.

Why here: experiments/probe_layers.py and experiments/probe_transfer.py both need it for a model, and
an experiment holds no shared helpers. Each step is kept in one StepCache directory, keyed by the
model's file hash, the documents and the settings, so a rerun reuses what is still valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memprobe.memdata import TokenSet, build_token_set
from memprobe.studies.cache import StepCache

SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"
QUICK_KINDS = ("licence", "speech", "literature", "model-sample", "formulaic", "repetition")


@dataclass
class ProbeData:
    loaded: Any
    docs: list[dict[str, Any]]
    records: list[dict[str, Any]]
    tokens: TokenSet
    store: Any


def shorten(doc: dict, max_words: int) -> dict:
    """Keep the first `max_words` words (at a word end); documents with a span stay whole."""
    if doc.get("span") is not None or len(doc["text"].split()) <= max_words:
        return doc
    cut, words = 0, 0
    for i, ch in enumerate(doc["text"]):
        if ch.isspace() and i and not doc["text"][i - 1].isspace():
            words += 1
            if words == max_words:
                cut = i
                break
    return {**doc, "text": doc["text"][:cut], "shortened_to_words": max_words}


def prepare_probe_data(
    model: str, cache_dir: str | Path, *, quick: bool, seed: int, max_words: int, sites: str = SITES
) -> ProbeData:
    """Corpus, labels, token set and a bfloat16 store of `sites` for `model`, cached in `cache_dir`.

    quick: a subset of kinds on a random tiny model, which is confident about nothing, so every token
    after the first counts as confident-correct: it checks the plumbing, not the science.
    """
    from memprobe.capture import capture
    from memprobe.corpora import bundled_corpus
    from memprobe.labels import label_documents
    from memprobe.models import load_model

    loaded = load_model(model)
    cache = StepCache(cache_dir)
    model_key = {k: loaded.info.get(k) for k in ("name", "sha256", "seed")}

    def corpus() -> list[dict]:
        docs = bundled_corpus(loaded, seed=seed)
        if quick:
            docs = [d for d in docs if d["kind"] in QUICK_KINDS][::3]
        return [shorten(d, max_words) for d in docs]

    docs = cache.json(
        "docs",
        corpus,
        inputs={"model": model_key},
        settings={"seed": seed, "quick": quick, "max_words": max_words},
        code=[corpus, shorten],
    )
    records = cache.json(
        "labels",
        lambda: label_documents(loaded, docs, progress=True),
        inputs={"model": model_key, "docs": [(d["id"], d["text"]) for d in docs]},
        code=[label_documents],
    )
    if quick:
        records = [
            {**r, "memorized": [False] + [True] * (r["n_tokens"] - 1), "memorized_fraction": 1.0}
            for r in records
        ]
    tokens = build_token_set(records)
    used = set(tokens.doc_id.tolist())
    store = capture(
        loaded,
        [d for d in docs if d["id"] in used],
        sites,
        Path(cache_dir) / "store",
        dtype="bfloat16",
        batch_tokens=1024,
    )
    return ProbeData(loaded, docs, records, tokens, store)
