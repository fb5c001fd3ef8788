"""`memprobe mia`: score texts with the membership attacks, evaluate scores against membership, or
measure canary exposure (--exposure) and PII / passage extraction (--extract) on membership-lab texts."""

from __future__ import annotations

import argparse

from memprobe.errors import MemprobeError


def cmd_mia(args: argparse.Namespace) -> int:
    from memprobe.jsonl import read_jsonl, write_jsonl

    if sum(map(bool, (args.evaluate, args.exposure, args.extract))) > 1:
        raise MemprobeError("give at most one of --evaluate, --exposure, --extract (they write different outputs)")
    docs = [d for path in args.input for d in read_jsonl(path)]
    duplicate = _first_duplicate([d["id"] for d in docs])
    if duplicate:
        raise MemprobeError(f"id {duplicate!r} appears in more than one --input file: ids must be unique")
    if args.evaluate:
        from memprobe.mia.evaluate import evaluate_mia
        from memprobe.results import save_results

        if not args.scores:
            raise MemprobeError("--evaluate needs --scores scores.jsonl (from `memprobe mia`) beside --input texts")
        scores = read_scores(args.scores)
        if any("member" not in d for d in docs):
            raise MemprobeError(f"{args.input}: every text needs a boolean 'member' field to evaluate against")
        result = evaluate_mia(scores, {d["id"]: bool(d["member"]) for d in docs},
                              copies={d["id"]: d.get("copies") for d in docs}, n_boot=args.n_boot,
                              seed=args.seed, figure=args.figure)
        save_results(args.output, result, seed=args.seed, scores=args.scores, texts=args.input)
        for name, block in result["attacks"].items():
            print(f"{name:16s} AUC {block['roc_auc']:.3f}  TPR@1%FPR {block['tpr_at_fpr_0.01']:.3f}")
        print(f"wrote {args.output}")
        return 0
    from memprobe.mia.attacks import score_texts
    from memprobe.models import load_model

    target = load_model(args.model)
    if args.exposure or args.extract:
        return _measure(args, target, docs)
    reference = load_model(args.reference_model) if args.reference_model else None
    records = score_texts(target, docs, reference=reference, k=args.k, batch_size=args.batch_size)
    settings = {"model": target.info, "reference": reference.info if reference else None, "k": args.k}
    write_jsonl(args.output, [{**r, "settings": settings} for r in records])
    print(f"wrote scores of {len(records)} texts to {args.output}")
    return 0


def _first_duplicate(ids: list[str]) -> str | None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def _measure(args: argparse.Namespace, target, docs: list[dict]) -> int:  # noqa: ANN001
    from memprobe.results import save_results

    if args.exposure:
        from memprobe.mia.exposure import exposure_report

        result = exposure_report(target, docs, exact_limit=args.exact_limit, n_samples=args.n_samples,
                                 seed=args.seed)
        for c, row in result["by_copies"].items():
            print(f"copies {c:>3}: {row['canaries']} canaries, mean exposure {row['mean_exposure']:.2f} bits")
    else:
        from memprobe.mia.extraction import passage_extractability, pii_extraction

        seen = None
        if args.seen_ids:
            from pathlib import Path

            seen = [line.strip() for line in Path(args.seen_ids).read_text().splitlines() if line.strip()]
        pii = pii_extraction(target, docs, seen_ids=seen, seed=args.seed, batch_size=args.batch_size)
        result = {"pii": pii, "passages": passage_extractability(target, docs, batch_size=args.batch_size)}
        print(f"TER {pii['ter']}  SER {pii.get('ser')}  non-member values extracted "
              f"{pii['nonmember_extraction_rate']}")
    save_results(args.output, {"model": target.info, **result}, seed=args.seed, texts=args.input)
    print(f"wrote {args.output}")
    return 0


def read_scores(path: str) -> list[dict]:
    """Score records from a `memprobe mia` output (validated: each line has id and a scores object)."""
    from memprobe.jsonl import json_lines

    records = []
    for n, record in json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) \
                or not isinstance(record.get("scores"), dict):
            raise MemprobeError(f"{path}:{n}: expected {{'id': str, 'scores': {{...}}}} from `memprobe mia`")
        records.append(record)
    return records


def add_mia(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registered name or local HF directory")
    p.add_argument("--input", required=True, action="append",
                   help="JSONL texts {id, text, ...} ('member' for --evaluate); repeat for several files")
    p.add_argument("--output", required=True, help="scores JSONL (JSON with --evaluate, --exposure, --extract)")
    p.add_argument("--reference-model", help="reference for the ref attack (same tokenizer; e.g. the base model)")
    p.add_argument("--k", type=float, default=0.2, help="fraction of lowest-scoring tokens for min-k%%(++)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--evaluate", action="store_true", help="evaluate --scores against the texts' 'member' field")
    p.add_argument("--scores", help="scores JSONL from `memprobe mia` (with --evaluate)")
    p.add_argument("--figure", help="with --evaluate: PNG of linear and log-log ROC curves")
    p.add_argument("--exposure", action="store_true", help="canary exposure of every text with a 'canary'")
    p.add_argument("--exact-limit", type=int, default=10**6,
                   help="with --exposure: enumerate spaces up to this size, fit a skew-normal above it")
    p.add_argument("--n-samples", type=int, default=5000, help="with --exposure: candidates for the fit")
    p.add_argument("--extract", action="store_true",
                   help="PII extraction (TER/SER) of texts with 'pii_spans', k-extractability of members")
    p.add_argument("--seen-ids", help="with --extract: file of member ids this checkpoint has seen (SER)")
    p.add_argument("--n-boot", type=int, default=1000, help="document-bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_mia)
