"""`memprobe audit`: from a model and texts to what it memorized, where, and how to suppress it.

Each step writes its output into the audit directory and is skipped when that output already
exists for the same inputs, so an interrupted audit resumes and a finished one is not recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError
from memprobe.jsonl import read_jsonl, write_jsonl
from memprobe.results import write_json

DEFAULT_SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"


@dataclass(frozen=True)
class AuditConfig:
    """What an audit was asked to do; an audit directory holds the audit of one config only."""

    model: str = "smollm2-135m"
    texts: str | None = None  # JSONL; None = the bundled corpus
    quick: bool = False
    seed: int = 0
    sites: str = DEFAULT_SITES
    dtype: str = "bfloat16"
    min_prob: float = 0.5


class Audit:
    """Runs the audit steps in order, each cached in `out/` under its own name."""

    def __init__(self, config: AuditConfig, out: str | Path) -> None:
        self.config = config
        self.out = Path(out)
        self.timings: dict[str, float] = {}
        self._loaded = None
        self._claim_directory()

    def _claim_directory(self) -> None:
        marker = self.out / "audit-config.json"
        mine = asdict(self.config)
        if marker.exists():
            theirs = json.loads(marker.read_text())
            if theirs != mine:
                diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
                raise MemprobeError(
                    f"--out {self.out} holds an audit with different settings {diff} (stored, asked): "
                    "choose another --out, or delete that directory to start over"
                )
        else:
            if self.out.exists() and any(self.out.iterdir()):
                raise MemprobeError(f"--out {self.out} is not empty and holds no audit: choose another --out")
            write_json(marker, mine)

    @property
    def loaded(self):
        if self._loaded is None:
            from memprobe.models import load_model

            self._loaded = load_model(self.config.model)
        return self._loaded

    def step(self, name: str, output: str, fn: Callable[[Path], Any]) -> Path:
        """Run `fn(path)` unless `path` (in the audit dir) already exists; time it."""
        path = self.out / output
        if path.exists():
            print(f"[audit] {name}: reusing {path}")
            return path
        print(f"[audit] {name} ...", flush=True)
        t = time.perf_counter()
        fn(path)
        self.timings[name] = time.perf_counter() - t
        return path

    # -- steps ------------------------------------------------------------------------------

    def texts(self, path: Path) -> None:
        from memprobe.corpora import bundled_corpus

        if self.config.texts:
            docs = read_jsonl(self.config.texts)
        else:
            docs = bundled_corpus(self.loaded, seed=self.config.seed)
        if self.config.quick:
            docs = _quick_subset(docs, per_kind=3)
        write_jsonl(path, docs)

    def label(self, path: Path) -> None:
        from memprobe.labels import label_documents

        docs = read_jsonl(self.out / "texts.jsonl")
        records = label_documents(self.loaded, docs, min_prob=self.config.min_prob, progress=True)
        for r in records:
            r["model"] = self.loaded.info
        write_jsonl(path, records)

    def capture(self, path: Path) -> None:
        from memprobe.capture import capture

        labels = read_jsonl(self.out / "labels.jsonl")
        docs = [{k: r[k] for k in ("id", "text", "kind") if k in r} for r in labels]
        columns = {c: {r["id"]: r[c] for r in labels} for c in ("memorized", "target_prob", "correct", "loss", "entropy")}
        capture(self.loaded, docs, self.config.sites, path, dtype=self.config.dtype, token_columns=columns)

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.step("texts", "texts.jsonl", self.texts)
        self.step("label", "labels.jsonl", self.label)
        self.step("capture", "store", self.capture)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        from memprobe.labels import summarize

        records = read_jsonl(self.out / "labels.jsonl")
        summary = {"model": records[0]["model"] if records else None, "by_kind": summarize(records),
                   "timings_s": self.timings}
        write_json(self.out / "results.json", summary)
        return summary


def _quick_subset(docs: list[dict], per_kind: int) -> list[dict]:
    """A few documents of every kind: enough to exercise every step in under two minutes."""
    seen: dict[str, int] = {}
    out = []
    for d in docs:
        k = str(d.get("kind"))
        if seen.get(k, 0) < per_kind:
            seen[k] = seen.get(k, 0) + 1
            out.append(d)
    return out


def default_out(config: AuditConfig) -> Path:
    key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"audit-{Path(config.model).name}-{'quick-' if config.quick else ''}{key}"


def cmd_audit(args: argparse.Namespace) -> int:
    from memprobe.cli import table

    config = AuditConfig(model=args.model, texts=args.texts, quick=args.quick, seed=args.seed)
    out = Path(args.out) if args.out else default_out(config)
    t = time.perf_counter()
    summary = Audit(config, out).run()
    print()
    print(table(summary["by_kind"], ["kind", "docs", "tokens", "memorized_token_rate", "k_extractable_rate",
                                     "mean_memorization_score"]))
    model = summary["model"] or {}
    print(f"\nmodel {model.get('name')} ({model.get('quantization')}); audit in {out} "
          f"({time.perf_counter() - t:.0f} s); results: {out / 'results.json'}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="label, capture and localize memorization; write a report")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", help="JSONL texts {id, text, ...} (default: the bundled corpus)")
    p.add_argument("--out", help="audit directory (default: runs/audit-<model>-<hash>); re-running resumes")
    p.add_argument("--quick", action="store_true", help="a few texts per kind (for tests, < 2 min)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_audit)
