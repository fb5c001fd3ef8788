"""Where the audit's suppression step spends its time, each shortcut against its slow peer in one run.

On the labels of a finished audit (default: the directory experiments/audit_smollm2.py writes), with
the audit's split and settings: training the low-rank edit in float32 vs with the frozen model in
bfloat16 autocast (`train_low_rank_edit(mixed_precision=...)`), and the evaluation of the unedited
model plus the edit and its random baseline at every strength as one full labelling pass per edit
(`document_rows`) vs one pass whose lower layers are replayed (`edit_tables`). Beside the times: both
edits' suppression and perplexity change on the held-out texts, and the largest difference between
the two evaluation paths' rows, so a speed-up that changed a result shows.

    .venv/bin/python benchmarks/bench_suppression.py [--audit-dir runs/audit-smollm2-default]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audit-dir", type=Path, default=ROOT / "runs" / "audit-smollm2-default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_suppression.json")
    args = ap.parse_args()
    import torch

    from memprobe.audit import MAX_TRAIN_CONTROLS, AuditConfig
    from memprobe.errors import MemprobeError
    from memprobe.intervene.suppress import split_memorized, targets_from_labels
    from memprobe.intervene.weight_edit import random_low_rank_like, train_low_rank_edit
    from memprobe.jsonl import read_jsonl
    from memprobe.models import load_model
    from memprobe.results import save_results
    from memprobe.studies.suppression import (
        SuppressionConfig,
        document_rows,
        edit_tables,
        ppl_change_of,
        suppression_of,
    )

    torch.set_num_threads(args.threads)
    labels = args.audit_dir / "labels.jsonl"
    if not labels.exists():
        raise MemprobeError(f"{labels} does not exist: run experiments/audit_smollm2.py first (or give --audit-dir)")
    audit = AuditConfig()
    loaded = load_model(audit.model)
    parts = split_memorized(read_jsonl(labels), seed=audit.seed, control_max=1.0, build_share=0.4)
    cfg = SuppressionConfig(seed=audit.seed, max_controls=MAX_TRAIN_CONTROLS)
    cut = cfg.max_tokens
    mem = targets_from_labels([r["token_ids"][:cut] for r in parts["build_memorized"]],
                              [r["memorized"][:cut] for r in parts["build_memorized"]])
    ctrl = targets_from_labels([r["token_ids"][:cut] for r in parts["build_control"]])
    held_mem = [r["token_ids"][:cut] for r in parts["heldout_memorized"]]
    held_ctrl = [r["token_ids"][:cut] for r in parts["heldout_control"]]
    ids = held_mem + held_ctrl
    load_start = os.getloadavg()

    training, edits = {}, {}
    for name, mixed in (("float32", False), ("bfloat16_autocast", True)):
        t = time.perf_counter()
        edits[name] = train_low_rank_edit(loaded.model, mem, ctrl, seed=cfg.seed, max_tokens=cut,
                                          max_controls=cfg.max_controls, mixed_precision=mixed)
        training[name] = {"seconds": time.perf_counter() - t, "final": edits[name].meta["final"]}
    edit = edits["bfloat16_autocast"]
    random_edit = random_low_rank_like(edit, seed=cfg.seed)
    configs = [e.with_strength(s) for s in cfg.strengths for e in (edit, random_edit)]
    t = time.perf_counter()
    slow = [document_rows(loaded.model, ids, None), *(document_rows(loaded.model, ids, e) for e in configs)]
    per_edit_seconds = time.perf_counter() - t
    t = time.perf_counter()
    fast = edit_tables(loaded.model, ids, configs)
    replay_seconds = time.perf_counter() - t
    n_mem = len(held_mem)
    quality = {}
    for name, e in edits.items():
        rows = edit_tables(loaded.model, ids, [e.with_strength(s) for s in cfg.strengths])
        quality[name] = {str(s): {"suppression": suppression_of(rows[0][:n_mem], r[:n_mem]),
                                  "ppl_change": ppl_change_of(rows[0][n_mem:], r[n_mem:])}
                         for s, r in zip(cfg.strengths, rows[1:], strict=True)}
    diff = max(float(np.abs(a - b).max()) for a, b in zip(fast, slow, strict=True))
    results = {
        "model": loaded.info, "audit_dir": str(args.audit_dir), "threads": args.threads,
        "split_sizes": {k: len(v) for k, v in parts.items()},
        "heldout_tokens_per_pass": int(sum(len(i) for i in ids)),
        "training_seconds": {k: v["seconds"] for k, v in training.items()},
        "training_speedup": training["float32"]["seconds"] / training["bfloat16_autocast"]["seconds"],
        "training_final_losses": {k: v["final"] for k, v in training.items()},
        "heldout_suppression_and_ppl_change_by_strength": quality,
        "evaluation_seconds": {"full_pass_per_edit": per_edit_seconds, "replayed_lower_layers": replay_seconds},
        "evaluation_passes": 1 + len(configs),
        "evaluation_speedup": per_edit_seconds / replay_seconds,
        "evaluation_max_abs_row_difference": diff,
        "order": "one round: float32 training, bfloat16 training, per-edit passes, replayed passes",
        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
    }
    save_results(args.out, results, seed=cfg.seed)
    print({k: results[k] for k in ("training_seconds", "evaluation_seconds", "evaluation_max_abs_row_difference")})


if __name__ == "__main__":
    main()
