"""The `memprobe` command: models, corpus, label, capture, info (and the analyses built on them).

Every subcommand is a thin layer over a library function; user errors (MemprobeError) print one
clear line and exit with status 2, never a traceback. The modules of this package import the
library only inside their functions: building the parser of one command imports that command's
configs only, so `memprobe --help` and `memprobe capture` start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from memprobe.cli import audit, core, defend, lab, mia, patch, probe
from memprobe.cli.table import table
from memprobe.errors import MemprobeError


class Command(NamedTuple):
    """One subcommand: its one-line help and the function that adds its options and handler."""

    help: str
    add_options: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {
    "models": Command("list the named models and whether they are installed", core.add_models),
    "corpus": Command("write the bundled corpus as JSONL", core.add_corpus),
    "label": Command("memorization ground truth per token and per sequence", core.add_label),
    "capture": Command("stream activations of chosen sites into a store", core.add_capture),
    "info": Command("summarise a store", core.add_info),
    "audit": Command("label, capture and localize memorization; write a report", audit.add_audit),
    "probe": Command("neuron-level memorization probes: train one, score texts", probe.add_probe),
    "patch": Command("write a HF model directory with memorization suppression baked in", patch.add_patch),
    "mia": Command("membership-inference scores (loss, zlib, min-k%%, min-k%%++, ref)", mia.add_mia),
    "lab": Command("the membership lab: a corpus with known members and non-members", lab.add_lab),
    "finetune": Command("fine-tune a causal LM on member documents (resumable)", lab.add_finetune),
    "defend": Command("judge one defense against an undefended fine-tune", defend.add_defend),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in `argv` gets its options (the others are listed)."""
    p = argparse.ArgumentParser(prog="memprobe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    chosen = words[0] if words else None
    for name, command in COMMANDS.items():
        parser = sub.add_parser(name, help=command.help)
        if name == chosen:
            command.add_options(parser)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return args.handler(args)
    except MemprobeError as exc:
        print(f"memprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memprobe {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "Command", "build_parser", "main", "table"]
