"""`memprobe mia`: score texts with the membership attacks, or evaluate scores against membership."""

from __future__ import annotations

import argparse

from memprobe.errors import MemprobeError


def cmd_mia(args: argparse.Namespace) -> int:
    from memprobe.jsonl import read_jsonl, write_jsonl

    docs = read_jsonl(args.input)
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
    reference = load_model(args.reference_model) if args.reference_model else None
    records = score_texts(target, docs, reference=reference, k=args.k, batch_size=args.batch_size)
    settings = {"model": target.info, "reference": reference.info if reference else None, "k": args.k}
    write_jsonl(args.output, [{**r, "settings": settings} for r in records])
    print(f"wrote scores of {len(records)} texts to {args.output}")
    return 0


def read_scores(path: str) -> list[dict]:
    """Score records from a `memprobe mia` output (validated: each line has id and a scores object)."""
    import json
    from pathlib import Path

    records = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MemprobeError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record.get("id"), str) or not isinstance(record.get("scores"), dict):
                raise MemprobeError(f"{path}:{n}: expected {{'id': str, 'scores': {{...}}}} from `memprobe mia`")
            records.append(record)
    return records


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mia", help="membership-inference scores (loss, zlib, min-k%%, min-k%%++, ref)")
    p.add_argument("--model", default="smollm2-135m", help="registered name or local HF directory")
    p.add_argument("--input", required=True, help="JSONL texts {id, text, ...} ('member' for --evaluate)")
    p.add_argument("--output", required=True, help="scores JSONL (or, with --evaluate, the evaluation JSON)")
    p.add_argument("--reference-model", help="reference for the ref attack (same tokenizer; e.g. the base model)")
    p.add_argument("--k", type=float, default=0.2, help="fraction of lowest-scoring tokens for min-k%%(++)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--evaluate", action="store_true", help="evaluate --scores against the texts' 'member' field")
    p.add_argument("--scores", help="scores JSONL from `memprobe mia` (with --evaluate)")
    p.add_argument("--figure", help="with --evaluate: PNG of linear and log-log ROC curves")
    p.add_argument("--n-boot", type=int, default=1000, help="document-bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_mia)
