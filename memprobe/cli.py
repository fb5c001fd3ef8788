"""The `memprobe` command: models, corpus, label, capture, info (and the analyses built on them).

Every subcommand is a thin layer over a library function; user errors (MemprobeError) print one
clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from memprobe.errors import MemprobeError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain aligned text table (numbers to 3 decimals, None as '-')."""

    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric, strict=True))

    return "\n".join([line(list(columns)), line(["-" * w for w in widths]), *map(line, cells)])


@command
def cmd_models(args: argparse.Namespace) -> int:
    from memprobe.models import REGISTRY, install_state

    rows = [{"name": s.name, "state": install_state(s.name), "quantization": s.quantization,
             "description": s.description} for s in REGISTRY.values()]
    print(table(rows, ["name", "state", "quantization", "description"]))
    return 0


def _docs(args: argparse.Namespace, loaded=None) -> list[dict]:
    from memprobe.corpora import bundled_corpus
    from memprobe.jsonl import read_jsonl

    if args.input:
        return read_jsonl(args.input)
    return bundled_corpus(loaded, seed=args.seed)


@command
def cmd_corpus(args: argparse.Namespace) -> int:
    from memprobe.corpora import bundled_corpus
    from memprobe.jsonl import write_jsonl
    from memprobe.models import load_model

    loaded = load_model(args.model) if args.model else None
    docs = bundled_corpus(loaded, seed=args.seed, include_model_samples=loaded is not None)
    write_jsonl(args.output, docs)
    print(f"wrote {len(docs)} documents to {args.output}")
    return 0


@command
def cmd_label(args: argparse.Namespace) -> int:
    from memprobe.jsonl import write_jsonl
    from memprobe.labels import label_documents, summarize
    from memprobe.models import load_model

    if getattr(args, "engine", None):
        from memprobe.distributed.cli import run_label

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


@command
def cmd_capture(args: argparse.Namespace) -> int:
    from memprobe.capture import capture
    from memprobe.models import load_model

    if getattr(args, "engine", None):
        from memprobe.distributed.cli import run_capture

        store = run_capture(args)
        if store is not None:
            print(_describe(store))
        return 0
    loaded = load_model(args.model)
    columns = _label_columns(args.labels) if args.labels else None
    store = capture(loaded, _docs(args, loaded), args.sites, args.out, backend=args.backend, dtype=args.dtype,
                    batch_tokens=args.batch_tokens, token_columns=columns, token_stats=args.token_stats,
                    truncate=args.truncate, overwrite=args.overwrite)
    print(_describe(store))
    return 0


def _label_columns(path: str) -> dict[str, dict[str, list]]:
    """Per-token label columns from a `memprobe label` output, for attaching to a capture."""
    from memprobe.jsonl import read_jsonl

    records = read_jsonl(path)
    names = ("memorized", "target_prob", "correct", "loss", "entropy", "top_prob")
    return {n: {r["id"]: r[n] for r in records if n in r} for n in names if any(n in r for r in records)}


def _describe(store) -> str:
    model = store.config.get("model", {})
    size = sum(s["bytes"] for s in store.manifest["shards"]) / 2**20
    lines = [
        f"store      {store.path}",
        f"model      {model.get('name')} ({model.get('quantization')}; sha256 {str(model.get('sha256'))[:12]})",
        f"backend    {store.config.get('backend')}   dtype {store.dtype}   complete {store.complete}",
        f"rows       {len(store)} tokens in {len(store.documents)} documents, {len(store.manifest['shards'])} shards, {size:.1f} MiB",
        f"sites      {len(store.sites)}: {', '.join(store.sites[:4])}{', ...' if len(store.sites) > 4 else ''}",
        f"columns    {', '.join(store.columns) or '-'}",
    ]
    return "\n".join(lines)


@command
def cmd_info(args: argparse.Namespace) -> int:
    import memprobe

    store = memprobe.open_store(args.store)
    if args.verify:
        store.verify()
    print(_describe(store))
    if args.verify:
        print("checksums  all shards verified")
    return 0


# Subcommands that analysis modules add (each module exposes `register_cli(subparsers)`); a module
# is imported only when its command runs (or for --help), so `memprobe capture` starts fast.
EXTENSIONS = {"audit": "memprobe.audit", "probe": "memprobe.probes", "patch": "memprobe.intervene.export", "mia": "memprobe.mia.cli"}
EXTENSIONS["lab"] = "memprobe.lab.cli"
EXTENSIONS["finetune"] = "memprobe.lab.cli"
EXTENSIONS["defend"] = "memprobe.defend.cli"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memprobe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the named models and whether they are installed")

    c = sub.add_parser("corpus", help="write the bundled corpus as JSONL")
    c.add_argument("--output", required=True)
    c.add_argument("--model", help="include text sampled from this model (a control)")
    c.add_argument("--seed", type=int, default=0)

    def texts(q: argparse.ArgumentParser, flag: str = "--input") -> None:
        q.add_argument("--model", default="smollm2-135m", help="registered name or local path (default smollm2-135m)")
        q.add_argument(flag, dest="input", help="JSONL texts {id, text, ...} (default: the bundled corpus)")
        q.add_argument("--seed", type=int, default=0, help="seed of the bundled corpus")

    lab = sub.add_parser("label", help="memorization ground truth per token and per sequence")
    texts(lab)
    lab.add_argument("--output", required=True, help="labels JSONL")
    lab.add_argument("--min-prob", type=float, default=0.5, help="a memorized token is correct with p >= this")
    lab.add_argument("--prefix-len", type=int, default=32)
    lab.add_argument("--suffix-len", type=int, default=32)
    lab.add_argument("--batch-size", type=int, default=8)
    from memprobe.distributed.cli import add_engine_arguments

    add_engine_arguments(lab)

    cap = sub.add_parser("capture", help="stream activations of chosen sites into a store")
    texts(cap)
    cap.add_argument("--sites", required=True, help="comma-separated sites or globs, e.g. 'blocks.*.hook_resid_post'")
    cap.add_argument("--out", required=True, help="store directory (re-running resumes)")
    cap.add_argument("--backend", default="hooks", choices=["hooks", "lens", "nnsight"])
    cap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cap.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward batch (memory bound)")
    cap.add_argument("--labels", help="labels JSONL from `memprobe label` to attach as per-token columns")
    cap.add_argument("--token-stats", action="store_true",
                     help="also store per-token log-prob, greedy match, entropy, top and std of log-probs "
                          "from the same forward (labels and MIA scores need no second pass; hooks backend)")
    cap.add_argument("--truncate", action="store_true", help="cut texts longer than the context instead of refusing")
    cap.add_argument("--overwrite", action="store_true", help="replace a different capture in --out")
    add_engine_arguments(cap)

    info = sub.add_parser("info", help="summarise a store")
    info.add_argument("store")
    info.add_argument("--verify", action="store_true", help="check every shard's checksum")

    import importlib

    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    wanted = [words[0]] if words and words[0] in EXTENSIONS else list(EXTENSIONS)
    for command_name in wanted:
        module = importlib.import_module(EXTENSIONS[command_name])
        module.register_cli(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    try:
        return handler(args)
    except MemprobeError as exc:
        print(f"memprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memprobe {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

