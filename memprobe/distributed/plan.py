"""The plan of a distributed job: which whole documents each shard entry holds, fixed before any work.

Why a plan file: every engine (one process, Ray, torchrun) runs the same entries and a merge puts
their outputs back in plan order, so the result cannot depend on the engine, the worker count or
which worker ran what. The plan is content-hashed and written into the job directory; a rerun with
other inputs or settings is refused instead of mixing two jobs.

Capture entries are runs of the capture's own batches (`memprobe.capture.batches`, longest first):
re-batching an entry's documents inside a worker gives back exactly those batches, so the merged
store has the shards, in the order, that a single-process capture writes. Label and MIA entries are
runs of documents in input order (the order of their JSONL output).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from memprobe.capture import batches, input_digest, tokenize_documents
from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.results import write_json
from memprobe.token_stats import STAT_COLUMNS

PLAN_FILE = "plan.json"
PLAN_FORMAT = "memprobe-distributed-plan"
PLAN_VERSION = 1
TOKENIZATION = "memprobe LoadedModel.encode (add_special_tokens=True)"  # as memprobe.capture records it


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _input(path: str | Path) -> dict[str, str]:
    path = Path(path).absolute()
    if not path.is_file():
        raise MemprobeError(f"input {path} does not exist: give a JSONL file of {{'id', 'text'}} documents")
    return {"path": str(path), "sha256": file_sha256(path)}


def _widths(loaded: LoadedModel, backend: str, sites: list[str]) -> dict[str, int]:
    """Width of each site from a one-token forward (true for any module path)."""
    from memprobe.backends import make_backend

    one = torch.tensor([loaded.encode("a")[:1]], device=loaded.device)
    acts = make_backend(backend, loaded).run(one, torch.ones_like(one), sites)
    return {s: int(acts[s].shape[-1]) for s in sites}


def _pack(groups: list[list[int]], lengths: list[int], entry_tokens: int) -> list[list[int]]:
    """Consecutive groups packed into entries of at most `entry_tokens` tokens (at least one group)."""
    entries: list[list[int]] = []
    used = 0
    for group in groups:
        size = sum(lengths[i] for i in group)
        if entries and used + size <= entry_tokens:
            entries[-1].extend(group)
            used += size
        else:
            entries.append(list(group))
            used = size
    return entries


def _entries(tokenized, members: list[list[int]], entry_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "index": n,
            "doc_indices": docs,
            "doc_ids": [tokenized[i].id for i in docs],
            "n_tokens": sum(len(tokenized[i].token_ids) for i in docs),
            "budget_tokens": entry_tokens,
            "tokens_sha256": input_digest([tokenized[i] for i in docs]),
        }
        for n, docs in enumerate(members)
    ]


def _finish(plan: dict[str, Any]) -> dict[str, Any]:
    plan = json.loads(json.dumps(plan))  # exactly what reads back from the file
    plan["sha256"] = plan_digest(plan)
    return plan


def plan_digest(plan: dict[str, Any]) -> str:
    """Hash of everything in the plan but the hash itself (canonical JSON)."""
    body = {k: v for k, v in plan.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_entry_tokens(entry_tokens: int, batch_tokens: int) -> None:
    if batch_tokens < 1 or entry_tokens < 1:
        raise MemprobeError(f"batch and entry token budgets must be positive, got {batch_tokens} and {entry_tokens}")


def capture_plan(
    loaded: LoadedModel,
    model_ref: str,
    input_path: str | Path,
    sites: str | list[str],
    *,
    backend: str = "hooks",
    dtype: str = "float32",
    batch_tokens: int = 2048,
    entry_tokens: int = 65536,
    truncate: bool = False,
    token_stats: bool = False,
    threads: int = 1,
    publish: str | None = None,
) -> dict[str, Any]:
    """The plan of a capture of `input_path`'s documents; `model_ref` is what workers load.

    `token_stats` stores the per-token statistics of the same forward, as `memprobe.capture` does.
    `publish` is an fsspec URL that finished parts and the merged store are copied to.

    `threads` is torch's intra-op thread count in every worker: CPU matmul results can change with
    it, so it is part of what makes two runs byte-identical.
    """
    from memprobe.jsonl import read_jsonl
    from memprobe.sites import resolve

    _check_entry_tokens(entry_tokens, batch_tokens)
    if token_stats and backend != "hooks":
        raise MemprobeError(f"token stats need the logits of the capture's own forward: use backend 'hooks', not {backend!r}")
    source = _input(input_path)
    tokenized = tokenize_documents(loaded, read_jsonl(source["path"]), truncate=truncate)
    sites = resolve(loaded.model, sites)
    lengths = [len(d.token_ids) for d in tokenized]
    members = _pack(batches(lengths, range(len(tokenized)), batch_tokens), lengths, entry_tokens)
    config = {  # the store config memprobe.capture writes, so the merged manifest is the same bytes
        "model": loaded.info,
        "backend": backend,
        "tokenization": TOKENIZATION,
        "inputs_sha256": input_digest(tokenized),
        "truncate": truncate,
        "token_columns": [],
        "token_stats": list(STAT_COLUMNS) if token_stats else [],
    }
    return _finish({
        "format": PLAN_FORMAT,
        "format_version": PLAN_VERSION,
        "task": "capture",
        "model": model_ref,
        "model_info": loaded.info,
        "input": source,
        "threads": threads,
        "settings": {"sites": sites, "widths": _widths(loaded, backend, sites), "backend": backend,
                     "dtype": dtype, "batch_tokens": batch_tokens, "truncate": truncate, "token_stats": token_stats,
                     "config": config},
        "documents": [{"id": d.id, "n_tokens": len(d.token_ids), **d.fields} for d in tokenized],
        "entries": _entries(tokenized, members, entry_tokens),
        "publish": publish,
    })


def records_plan(
    task: str,
    loaded: LoadedModel,
    model_ref: str,
    input_path: str | Path,
    settings: dict[str, Any],
    *,
    entry_tokens: int = 65536,
    threads: int = 1,
) -> dict[str, Any]:
    """The plan of a per-document task (`label`, `mia`): entries are runs of documents in input
    order, and `settings` are the keyword arguments of the task's function."""
    from memprobe.jsonl import read_jsonl

    _check_entry_tokens(entry_tokens, 1)
    source = _input(input_path)
    tokenized = tokenize_documents(loaded, read_jsonl(source["path"]))
    lengths = [len(d.token_ids) for d in tokenized]
    members = _pack([[i] for i in range(len(tokenized))], lengths, entry_tokens)
    return _finish({
        "format": PLAN_FORMAT,
        "format_version": PLAN_VERSION,
        "task": task,
        "model": model_ref,
        "model_info": loaded.info,
        "input": source,
        "threads": threads,
        "settings": settings,
        "documents": [{"id": d.id, "n_tokens": len(d.token_ids)} for d in tokenized],
        "entries": _entries(tokenized, members, entry_tokens),
    })


def write_plan(job_dir: str | Path, plan: dict[str, Any]) -> Path:
    """Write `plan` into `job_dir`, or accept the identical plan already there; refuse another one."""
    path = Path(job_dir) / PLAN_FILE
    if path.exists():
        old = read_plan(job_dir)
        if old["sha256"] != plan["sha256"]:
            raise MemprobeError(
                f"{path} holds the plan of a different job ({_plan_difference(old, plan)}); "
                "choose another output directory, or delete it to start over"
            )
        return path
    return write_json(path, plan)


def read_plan(job_dir: str | Path) -> dict[str, Any]:
    """The plan in `job_dir`, checked against its own hash (a hand-edited plan is refused)."""
    path = Path(job_dir) / PLAN_FILE
    if not path.is_file():
        raise MemprobeError(f"no {PLAN_FILE} in {job_dir}: plan the job first (memprobe capture/label --engine ...)")
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MemprobeError(f"{path} is unreadable ({exc}); delete the directory and re-run the job") from exc
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise MemprobeError(f"{path} is not a memprobe distributed plan; choose another output directory")
    if plan.get("format_version", 0) > PLAN_VERSION:
        raise MemprobeError(f"{path} was written by a newer memprobe (plan format {plan['format_version']}); upgrade")
    if plan.get("sha256") != plan_digest(plan):
        raise MemprobeError(
            f"{path} does not match its own hash: it was edited or damaged; delete the directory and re-run the job"
        )
    return plan


def _plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in ("task", "model", "model_info", "input", "threads", "settings", "documents", "entries"):
        if old.get(key) != new.get(key):
            return f"{key} differs"
    return "contents differ"
