"""`memprobe models | corpus | label | capture | info`: the core commands, thin layers over the
registry, the bundled corpus, the labeler, the capture and the store."""

from __future__ import annotations

import argparse

from memprobe.cli.distributed import add_engine_arguments
from memprobe.cli.table import table


def _models(args: argparse.Namespace) -> int:
    from memprobe.models import REGISTRY, install_state

    rows = [{"name": s.name, "state": install_state(s.name), "quantization": s.quantization,
             "description": s.description} for s in REGISTRY.values()]
    print(table(rows, ["name", "state", "quantization", "description"]))
    return 0


def add_models(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=_models)


def _docs(args: argparse.Namespace, loaded=None) -> list[dict]:  # noqa: ANN001
    from memprobe.corpora import bundled_corpus
    from memprobe.jsonl import read_jsonl

    if args.input:
        return read_jsonl(args.input)
    return bundled_corpus(loaded, seed=args.seed)


def _corpus(args: argparse.Namespace) -> int:
    from memprobe.corpora import bundled_corpus
    from memprobe.jsonl import write_jsonl
    from memprobe.models import load_model

    loaded = load_model(args.model) if args.model else None
    docs = bundled_corpus(loaded, seed=args.seed, include_model_samples=loaded is not None)
    write_jsonl(args.output, docs)
    print(f"wrote {len(docs)} documents to {args.output}")
    return 0


def add_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True)
    p.add_argument("--model", help="include text sampled from this model (a control)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_corpus)


def _texts(p: argparse.ArgumentParser, flag: str = "--input") -> None:
    p.add_argument("--model", default="smollm2-135m", help="registered name or local path (default smollm2-135m)")
    p.add_argument(flag, dest="input", help="JSONL texts {id, text, ...} (default: the bundled corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bundled corpus")


def _label(args: argparse.Namespace) -> int:
    from memprobe.jsonl import write_jsonl
    from memprobe.labels import label_documents, summarize
    from memprobe.models import load_model

    if getattr(args, "engine", None):
        from memprobe.cli.distributed import run_label

        run_label(args)
        return 0
    loaded = load_model(args.model)
    records = label_documents(loaded, _docs(args, loaded), min_prob=args.min_prob, prefix_len=args.prefix_len,
                              suffix_len=args.suffix_len, batch_size=args.batch_size, progress=True)
    for r in records:
        r["model"] = loaded.info
    write_jsonl(args.output, records)
    print(table(summarize(records), ["kind", "docs", "tokens", "memorized_token_rate", "k_extractable_rate",
                                     "mean_memorization_score"]))
    print(f"\nwrote labels of {len(records)} documents to {args.output} ({loaded.info['quantization']})")
    return 0


def add_label(p: argparse.ArgumentParser) -> None:
    _texts(p)
    p.add_argument("--output", required=True, help="labels JSONL")
    p.add_argument("--min-prob", type=float, default=0.5, help="a memorized token is correct with p >= this")
    p.add_argument("--prefix-len", type=int, default=32)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    add_engine_arguments(p)
    p.set_defaults(handler=_label)


def _capture(args: argparse.Namespace) -> int:
    from memprobe.capture import capture
    from memprobe.models import load_model

    if getattr(args, "engine", None):
        from memprobe.cli.distributed import run_capture

        store = run_capture(args)
        if store is not None:
            print(describe_store(store))
        return 0
    loaded = load_model(args.model)
    columns = _label_columns(args.labels) if args.labels else None
    store = capture(loaded, _docs(args, loaded), args.sites, args.out, backend=args.backend, dtype=args.dtype,
                    batch_tokens=args.batch_tokens, token_columns=columns, token_stats=args.token_stats,
                    truncate=args.truncate, overwrite=args.overwrite)
    print(describe_store(store))
    return 0


def add_capture(p: argparse.ArgumentParser) -> None:
    _texts(p)
    p.add_argument("--sites", required=True, help="comma-separated sites or globs, e.g. 'blocks.*.hook_resid_post'")
    p.add_argument("--out", required=True, help="store directory (re-running resumes)")
    p.add_argument("--backend", default="hooks", choices=["hooks", "lens", "nnsight"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward batch (memory bound)")
    p.add_argument("--labels", help="labels JSONL from `memprobe label` to attach as per-token columns")
    p.add_argument("--token-stats", action="store_true",
                   help="also store per-token log-prob, greedy match, entropy, top and std of log-probs "
                        "from the same forward (labels and MIA scores need no second pass; hooks backend)")
    p.add_argument("--truncate", action="store_true", help="cut texts longer than the context instead of refusing")
    p.add_argument("--overwrite", action="store_true", help="replace a different capture in --out")
    add_engine_arguments(p)
    p.set_defaults(handler=_capture)


def _label_columns(path: str) -> dict[str, dict[str, list]]:
    """Per-token label columns from a `memprobe label` output, for attaching to a capture."""
    from memprobe.jsonl import read_jsonl

    records = read_jsonl(path)
    names = ("memorized", "target_prob", "correct", "loss", "entropy", "top_prob")
    return {n: {r["id"]: r[n] for r in records if n in r} for n in names if any(n in r for r in records)}


def describe_store(store) -> str:  # noqa: ANN001
    """The summary `memprobe info` and `memprobe capture` print of a store."""
    model = store.config.get("model", {})
    size = sum(s["bytes"] for s in store.manifest["shards"]) / 2**20
    lines = [
        f"store      {store.path}",
        f"model      {model.get('name')} ({model.get('quantization')}; sha256 {str(model.get('sha256'))[:12]})",
        f"backend    {store.config.get('backend')}   dtype {store.dtype}   complete {store.complete}",
        f"rows       {len(store)} tokens in {len(store.documents)} documents, "
        f"{len(store.manifest['shards'])} shards, {size:.1f} MiB",
        f"sites      {len(store.sites)}: {', '.join(store.sites[:4])}{', ...' if len(store.sites) > 4 else ''}",
        f"columns    {', '.join(store.columns) or '-'}",
    ]
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    import memprobe

    store = memprobe.open_store(args.store)
    if args.verify:
        store.verify()
    print(describe_store(store))
    if args.verify:
        print("checksums  all shards verified")
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("store")
    p.add_argument("--verify", action="store_true", help="check every shard's checksum")
    p.set_defaults(handler=_info)
