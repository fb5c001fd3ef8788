"""`memprobe probe train` and `memprobe probe score`: thin layers over memprobe.probes.artefact."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    import tempfile

    from memprobe.capture import capture
    from memprobe.corpora import bundled_corpus
    from memprobe.jsonl import read_jsonl
    from memprobe.labels import label_documents
    from memprobe.models import load_model
    from memprobe.probes.artefact import (
        probe_capture_sites,
        probe_tokens,
        save_directions,
        save_probe,
        train_probe,
    )
    from memprobe.sites import resolve

    loaded = load_model(args.model)
    docs = read_jsonl(args.data) if args.data else bundled_corpus(loaded, seed=args.seed)
    site = args.site or f"blocks.{loaded.model.config.num_hidden_layers // 2}.hook_resid_post"
    if site != "auto":
        (site,) = resolve(loaded.model, site) if "*" not in site else (site,)
    # label with the model, capture the labelled documents, then fit on the store (the probe never runs the model)
    records = label_documents(loaded, docs, progress=True)
    tokens = probe_tokens(records, min_doc_fraction=args.min_doc_fraction)
    used = set(tokens.doc_id.tolist())
    sites = probe_capture_sites(site, candidates=args.candidates, directions=args.directions)
    with tempfile.TemporaryDirectory(prefix="memprobe-probe-") as tmp:
        store = capture(loaded, [d for d in docs if d["id"] in used], sites, tmp, dtype=args.dtype, progress=True)
        probe, training = train_probe(store, tokens, site=site, alpha=args.alpha, window=args.window, progress=True,
                                      candidates=args.candidates, n_folds=args.folds, seed=args.seed,
                                      directions=args.directions)
    training.update({"min_doc_fraction": args.min_doc_fraction,
                     "labeler": records[0]["labeler"] if records else None})
    site = training["site"]
    directions = training.pop("directions", None)
    training["data"] = args.data or f"bundled corpus (seed {args.seed})"
    training["made_by"] = "memprobe probe train"
    out = save_probe(args.out, probe, site=site, model_info=loaded.info, training=training, window=args.window)
    if directions is not None:
        save_directions(args.out, directions)
    if "site_selection" in training:
        print(f"chose {site}: inner grouped-CV AUC {training['site_selection']['cv_auc_inner']:.3f} "
              f"({training['site_selection']['method']})")
    counts = training["tokens"]
    print(f"trained a probe at {site} on {counts['memorized']['tokens']} memorized and "
          f"{counts['control']['tokens']} confident control tokens; wrote {out}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from memprobe.jsonl import read_jsonl, write_jsonl
    from memprobe.models import load_model
    from memprobe.probes.artefact import default_probe_dir, load_probe, score_documents

    loaded = load_model(args.model)
    probe, config = load_probe(args.probe or default_probe_dir(loaded.name))
    records = score_documents(loaded, read_jsonl(args.input), probe, config, batch_tokens=args.batch_tokens)
    write_jsonl(args.output, records)
    print(f"scored {sum(len(r['token_ids']) for r in records)} tokens of {len(records)} texts with the probe "
          f"at {config['site']}; wrote {args.output}")
    return 0


def add_probe(probe: argparse.ArgumentParser) -> None:
    """Add `memprobe probe {train,score}`."""
    from memprobe.probes.artefact import AUTO_SITES, DEFAULT_WINDOW

    sub = probe.add_subparsers(dest="probe_command", required=True)

    train = sub.add_parser("train", help="label texts, then fit a logistic probe at one site")
    train.add_argument("--model", default="smollm2-135m")
    train.add_argument("--data", help="JSONL {id, text, role: candidate|control, ...} (default: the bundled corpus)")
    train.add_argument("--out", required=True, help="directory for probe.safetensors + probe.json")
    train.add_argument("--site", help="one site, e.g. blocks.20.hook_resid_post, or 'auto': the --candidates site with "
                       "the best grouped-CV AUC inside the training data (default: the middle layer's resid_post)")
    train.add_argument("--candidates", default=AUTO_SITES, help="sites --site auto chooses among (a glob)")
    train.add_argument("--folds", type=int, default=5, help="document-grouped CV folds of --site auto")
    train.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                       help="dtype of the temporary activation capture (bfloat16: half the disk)")
    train.add_argument("--directions", action="store_true",
                       help="also write directions.safetensors: a per-position probe direction per residual layer")
    train.add_argument("--alpha", type=float, default=1e-2, help="L2 penalty on standardised weights")
    train.add_argument("--min-doc-fraction", type=float, default=0.5,
                       help="a candidate text counts as memorized when this share of its tokens is")
    train.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                       help="average the activations of this many positions before each token (1: that position only)")
    train.add_argument("--seed", type=int, default=0, help="seed of the bundled corpus")
    train.set_defaults(handler=_train)

    score = sub.add_parser("score", help="per-token memorization scores (null at the first token)")
    score.add_argument("--model", default="smollm2-135m")
    score.add_argument("--input", required=True, help="JSONL {id, text}")
    score.add_argument("--output", required=True, help="JSONL {id, token_ids, scores}")
    score.add_argument("--probe", help="probe directory (default: the shipped probe of --model)")
    score.add_argument("--batch-tokens", type=int, default=2048)
    score.set_defaults(handler=_score)
