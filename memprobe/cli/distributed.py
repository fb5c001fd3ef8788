"""The `--engine` options of `memprobe capture` and `memprobe label`, and their handlers.

Kept apart so `memprobe.cli.core` only adds one call per parser and one branch per handler, and so
building the parser imports nothing heavy (Ray and torch load only when an engine runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memprobe.cli.options import add_config_options, config_from_args
from memprobe.errors import MemprobeError


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine (no default: without it the command runs as one plain process), the Ray options
    generated from EngineOptions, and the job's own settings."""
    from memprobe.distributed.engines import ENGINES, EngineOptions

    g = parser.add_argument_group("distributed run (a plan of whole-document shards, merged into one output)")
    g.add_argument("--engine", choices=list(ENGINES),
                   help="run as a planned job: 'process' (here), 'ray' (Ray Data actors), 'torchrun' "
                        "(launched by torchrun); the output equals the one-process run's")
    add_config_options(g, EngineOptions, exclude=["engine"])
    g.add_argument("--entry-tokens", type=int, default=65536, help="tokens per plan entry (default 65536)")
    g.add_argument("--work-dir", help="local job directory when --out is an fsspec URL (file://, memory://); "
                                      "shared by the workers (default: under the system temp)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default 1; CPU results can change with it)")


def _options(args: argparse.Namespace):  # noqa: ANN202
    from memprobe.distributed.engines import EngineOptions

    if not args.input:
        raise MemprobeError("--engine needs --input: a JSONL file every worker can read")
    return config_from_args(EngineOptions, args)


def run_capture(args: argparse.Namespace) -> object | None:
    """`memprobe capture --engine ...`: the merged store (None on torchrun ranks other than 0)."""
    from memprobe.distributed.job import capture_job

    unsupported = [flag for flag, on in (("--labels", args.labels), ("--overwrite", args.overwrite)) if on]
    if unsupported:
        raise MemprobeError(f"{', '.join(unsupported)} is not supported with --engine yet; run without --engine")
    store, report = capture_job(args.model, args.input, args.sites, args.out, backend=args.backend,
                                dtype=args.dtype, batch_tokens=args.batch_tokens, entry_tokens=args.entry_tokens,
                                truncate=args.truncate, token_stats=getattr(args, "token_stats", False),
                                threads=args.threads, options=_options(args), work_dir=args.work_dir)
    if store is not None:
        print(f"engine     {args.engine}: {len(report.computed)} entries computed, {len(report.skipped)} "
              f"already finished (runs/ beside the store{', published to ' + args.out if '://' in args.out else ''})")
    return store


def run_label(args: argparse.Namespace) -> Path | None:
    """`memprobe label --engine ...`: the merged labels file (None on torchrun ranks other than 0)."""
    from memprobe.distributed.job import label_job

    path, report = label_job(args.model, args.input, args.output, min_prob=args.min_prob,
                             prefix_len=args.prefix_len, suffix_len=args.suffix_len, batch_size=args.batch_size,
                             entry_tokens=args.entry_tokens, threads=args.threads, options=_options(args))
    if path is not None:
        print(f"wrote labels to {path} (engine {args.engine}: {len(report.computed)} entries computed, "
              f"{len(report.skipped)} already finished)")
    return path
