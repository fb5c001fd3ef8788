"""`memprobe lab build` and `memprobe finetune`: thin layers over build_lab and finetune."""

from __future__ import annotations

import argparse


def _lab_build(args: argparse.Namespace) -> int:
    from memprobe.lab.corpus import build_lab

    manifest = build_lab(args.out, preset=args.preset, seed=args.seed)
    counts, dups = manifest["counts"], manifest["near_duplicates"]
    print(
        f"wrote {counts['members']} members ({counts['member_copies_total']} with copies) and "
        f"{counts['nonmembers']} non-members to {args.out}; about "
        f"{manifest['train_tokens_estimate']['members']:,} training tokens (chars/4); "
        f"{dups['nonmembers_dropped']} near-duplicate non-members dropped"
    )
    return 0


def _steps(text: str | None) -> list[int] | None:
    from memprobe.errors import MemprobeError

    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise MemprobeError(
            f"--save-steps {text!r}: give comma-separated step numbers, e.g. 50,100"
        ) from exc


def _finetune(args: argparse.Namespace) -> int:
    from memprobe.errors import MemprobeError
    from memprobe.lab.finetune import finetune

    if args.save_steps and args.save_every:
        raise MemprobeError("give either --save-steps or --save-every, not both")
    result = finetune(
        args.model,
        args.train,
        args.out,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora=args.lora,
        lora_rank=args.lora_rank,
        seed=args.seed,
        save_steps=args.save_every or _steps(args.save_steps),
        state_every=args.state_every,
        warmup_steps=args.warmup_steps,
        progress=not args.no_progress,
    )
    print(
        f"fine-tuned {result['base_model']['name']} for {result['steps']['done']} steps "
        f"({result['tokens_seen']:,} tokens, {result['train_seconds']:.0f} s) into {args.out}"
    )
    return 0


def add_lab(lab: argparse.ArgumentParser) -> None:
    """Add `memprobe lab build`."""
    from memprobe.lab.corpus import PRESETS

    actions = lab.add_subparsers(dest="lab_command", required=True)
    build = actions.add_parser("build", help="write members.jsonl, nonmembers.jsonl and manifest.json")
    build.add_argument("--out", required=True, help="directory for the lab")
    build.add_argument("--preset", default="small", choices=list(PRESETS))
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=_lab_build)


def add_finetune(ft: argparse.ArgumentParser) -> None:
    ft.add_argument("--model", required=True, help="registered name or local HF/GGUF path")
    ft.add_argument("--train", required=True, help="members.jsonl (lab or plain {id, text} lines) or a lab dir")
    ft.add_argument("--out", required=True, help="output directory (re-running the same command resumes)")
    ft.add_argument("--epochs", type=int, default=1)
    ft.add_argument("--lr", type=float, default=5e-5)
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--seq-len", type=int, default=256, help="longer documents are cut into windows")
    ft.add_argument("--lora", action="store_true", help="train a LoRA adapter (merged into the saved weights)")
    ft.add_argument("--lora-rank", type=int, default=8)
    ft.add_argument("--warmup-steps", type=int, default=0)
    ft.add_argument("--save-steps", help="comma-separated steps to write checkpoint-<step>/ at")
    ft.add_argument("--save-every", type=int, help="write checkpoint-<step>/ every N steps")
    ft.add_argument("--state-every", type=int, help="steps between resume states (default 100)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(handler=_finetune)
