"""The shard function: run one plan entry and commit its output, the same whichever engine calls it.

Why pure and self-contained: an engine may run an entry on any worker, twice (a retry after a
crash), or not at all (a rerun skips finished entries). So the function reads everything from the
plan, writes only inside its own part directory, and marks the entry done last, after verifying
what it wrote. The model is loaded once per worker process and cached; torch's thread count is
fixed from the plan because CPU matmul results can change with it.

Capture parts are StoreWriter directories whose manifest lists every planned document (those of
other entries with zero tokens), so shards hold global document indices and their bytes are those a
single-process capture writes; the merge only renames them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from memprobe.capture import (
    TokenizedDoc,
    batches,
    input_digest,
    pad_batch,
    pad_id,
    run_to_logits,
    stat_columns,
    tokenize_documents,
)
from memprobe.errors import MemprobeError
from memprobe.io import atomic_write
from memprobe.jsonl import read_jsonl, write_jsonl
from memprobe.models import LoadedModel, load_model
from memprobe.results import write_json
from memprobe.store import MANIFEST, ActivationStore, StoreWriter

PARTS = "parts"
RUNS = "runs"
MAX_ATTEMPTS = 4  # starts of one entry within one job run; beyond, the entry is what kills workers
FAULT_ENV = "MEMPROBE_FAULT_EXIT_ONCE"  # "<marker file>:<entry>": tests kill a worker mid-entry once

_MODELS: dict[str, LoadedModel] = {}
_BACKENDS: dict[tuple[str, str], Any] = {}
_INPUTS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}


def part_dir(job_dir: str | Path, index: int) -> Path:
    return Path(job_dir) / PARTS / f"entry-{index:05d}"


def done_file(job_dir: str | Path, index: int) -> Path:
    """Written last by the shard function: the entry's output is complete and was verified."""
    return part_dir(job_dir, index) / "done.json"


def records_part(job_dir: str | Path, index: int) -> Path:
    return part_dir(job_dir, index) / "records.jsonl"


def attempts_file(job_dir: str | Path, index: int) -> Path:
    return Path(job_dir) / PARTS / f"entry-{index:05d}.attempts"


def _count_attempt(job_dir: Path, index: int) -> None:
    """Refuse an entry started MAX_ATTEMPTS times in this run: engines retry dead workers forever."""
    path = attempts_file(job_dir, index)
    n = int(path.read_text()) if path.is_file() else 0
    if n >= MAX_ATTEMPTS:
        raise MemprobeError(
            f"entry {index} was started {n} times in this run and its worker died each time (out of memory? "
            "a crash in the model?); see the worker logs, fix the cause and re-run"
        )
    atomic_write(path, str(n + 1))


def remember_model(model_ref: str, loaded: LoadedModel) -> None:
    """Seed the worker cache with a model already loaded in this process (the planner's)."""
    _MODELS[model_ref] = loaded


def worker_model(plan: dict[str, Any]) -> LoadedModel:
    """The plan's model, loaded once per process, on the GPU when there is one."""
    torch.set_num_threads(int(plan["threads"]))
    ref = plan["model"]
    if ref not in _MODELS:
        try:
            loaded = load_model(ref)
        except MemprobeError as exc:
            raise MemprobeError(f"worker on {socket.gethostname()} cannot load model {ref!r}: {exc}") from exc
        except OSError as exc:
            raise MemprobeError(
                f"worker on {socket.gethostname()} cannot load model {ref!r} ({exc}): the model path must "
                "be readable from every worker (shared storage, or the same path on each node)"
            ) from exc
        if torch.cuda.is_available():  # unmeasured here (no GPU on the development machine)
            loaded.model.to("cuda")
        _MODELS[ref] = loaded
    loaded = _MODELS[ref]
    if loaded.info != plan["model_info"]:
        raise MemprobeError(
            f"worker loaded {ref!r} as {loaded.info}, but the plan was made with {plan['model_info']}: "
            "every worker must see the same model files"
        )
    return loaded


def _documents(plan: dict[str, Any], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The entry's input documents ({"id", "text", ...}), from the plan's input file (cached)."""
    source = plan["input"]
    key = (source["path"], source["sha256"])
    if key not in _INPUTS:
        from memprobe.distributed.plan import file_sha256

        if not Path(source["path"]).is_file() or file_sha256(source["path"]) != source["sha256"]:
            raise MemprobeError(
                f"input {source['path']} is missing or changed since the plan was made; restore it, "
                "or delete the job directory and plan again"
            )
        _INPUTS[key] = {d["id"]: d for d in read_jsonl(source["path"])}
    by_id = _INPUTS[key]
    return [by_id[i] for i in entry["doc_ids"]]


def _tokenized(loaded: LoadedModel, plan: dict[str, Any], entry: dict[str, Any]) -> list[TokenizedDoc]:
    truncate = bool(plan["settings"].get("truncate", False))
    docs = tokenize_documents(loaded, _documents(plan, entry), truncate=truncate)
    if input_digest(docs) != entry["tokens_sha256"]:
        raise MemprobeError(
            f"entry {entry['index']}: the worker's tokenisation differs from the plan's; every worker "
            "must use the same model and tokenizer files"
        )
    return docs


def _maybe_fault(job_dir: Path, index: int) -> None:
    """Kill this process once, mid-entry, when the test fault is armed for this entry."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    marker, _, target = spec.rpartition(":")
    if int(target) == index and not Path(marker).exists():
        atomic_write(marker, f"{os.getpid()}\n")
        os._exit(1)


def entry_done(job_dir: str | Path, plan: dict[str, Any], index: int) -> bool:
    """Whether entry `index` has a verified output of this plan (a damaged one counts as not done)."""
    marker = done_file(job_dir, index)
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if done.get("plan_sha256") != plan["sha256"]:
        return False
    try:
        if plan["task"] == "capture":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a part is never "complete": it holds one entry
                store = ActivationStore.open(part_dir(job_dir, index))
            if store.manifest["shards"] != done["shards"]:
                return False
            store.verify()
        else:
            from memprobe.distributed.plan import file_sha256

            if file_sha256(records_part(job_dir, index)) != done["sha256"]:
                return False
    except (MemprobeError, OSError):
        return False
    return True


def run_entry(job_dir: str | Path, plan: dict[str, Any], index: int) -> dict[str, Any]:
    """Run plan entry `index` unless it is already done; returns what happened (with provenance)."""
    job_dir = Path(job_dir)
    if entry_done(job_dir, plan, index):
        return {"entry": index, "status": "skipped"}
    began, started_unix = time.perf_counter(), time.time()
    _count_attempt(job_dir, index)
    loaded = worker_model(plan)
    started = time.perf_counter()  # compute time excludes the once-per-worker model load
    entry = plan["entries"][index]
    if plan["task"] == "capture":
        result = _capture_entry(job_dir, plan, entry, loaded)
    elif plan["task"] in RECORD_TASKS:
        result = _records_entry(job_dir, plan, entry, loaded)
    else:
        raise MemprobeError(f"unknown task {plan['task']!r} in the plan; upgrade memprobe")
    record = {"entry": index, "status": "computed", **_provenance(loaded, plan),
              "seconds": time.perf_counter() - started, "load_seconds": started - began,
              "started_unix": started_unix, "n_tokens": entry["n_tokens"]}
    write_json(job_dir / RUNS / f"entry-{index:05d}.json", record)  # varies by run: outside compared bytes
    write_json(done_file(job_dir, index), {"plan_sha256": plan["sha256"], "entry": index, **result})
    attempts_file(job_dir, index).unlink(missing_ok=True)
    if plan.get("publish"):  # object storage: the part is durable (and resumable) elsewhere too
        from memprobe.distributed.remote import publish

        publish(part_dir(job_dir, index), part_url(plan["publish"], index))
    return record


def part_url(url: str, index: int) -> str:
    return f"{url.rstrip('/')}/{PARTS}/entry-{index:05d}"


def _provenance(loaded: LoadedModel, plan: dict[str, Any]) -> dict[str, Any]:
    param = next(loaded.model.parameters())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": str(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
        "attn_implementation": getattr(loaded.model.config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _backend(loaded: LoadedModel, plan: dict[str, Any]):
    from memprobe.backends import make_backend

    key = (plan["model"], plan["settings"]["backend"])
    if key not in _BACKENDS:
        _BACKENDS[key] = make_backend(key[1], loaded)
    return _BACKENDS[key]


def _capture_entry(job_dir: Path, plan: dict[str, Any], entry: dict[str, Any], loaded: LoadedModel) -> dict:
    settings = plan["settings"]
    docs = _tokenized(loaded, plan, entry)
    mine = set(entry["doc_indices"])
    documents = [d if i in mine else {"id": d["id"], "n_tokens": 0} for i, d in enumerate(plan["documents"])]
    lengths = [d["n_tokens"] for d in plan["documents"]]
    groups = batches(lengths, entry["doc_indices"], settings["batch_tokens"])  # the plan's batches
    part = part_dir(job_dir, entry["index"])

    def open_part() -> StoreWriter:
        return StoreWriter(part, config=settings["config"], sites=settings["sites"], widths=settings["widths"],
                           dtype=settings["dtype"], documents=documents)

    writer = open_part()
    committed = [s["documents"] for s in json.loads((part / MANIFEST).read_text())["shards"]]
    if committed != groups[: len(committed)]:  # a damaged batch was dropped: order would change
        shutil.rmtree(part)
        writer, committed = open_part(), []
    tokens = dict(zip(entry["doc_indices"], docs, strict=True))
    runner, sites, pad, device = _backend(loaded, plan), settings["sites"], pad_id(loaded), loaded.device
    for n, group in enumerate(groups[len(committed):]):
        ids, mask = pad_batch([tokens[i].token_ids for i in group], pad)
        keep = mask.bool()
        if settings.get("token_stats"):
            acts, logits = run_to_logits(loaded, ids.to(device), mask.to(device), sites)
            columns = stat_columns(logits, ids, keep)
            del logits
        else:
            acts, columns = runner.run(ids.to(device), mask.to(device), sites), None
        rows = {s: acts[s][keep.to(acts[s].device)].cpu() for s in sites}
        doc_index = torch.cat([torch.full((lengths[i],), i, dtype=torch.long) for i in group])
        position = torch.cat([torch.arange(lengths[i]) for i in group])
        writer.write_shard(group, rows, doc_index, position, ids[keep], columns)
        if n == 0:
            _maybe_fault(job_dir, entry["index"])  # after one committed batch: a real mid-entry crash
    manifest = json.loads((part / MANIFEST).read_text())
    if [s["documents"] for s in manifest["shards"]] != groups:
        raise MemprobeError(f"entry {entry['index']}: its part in {part} does not hold the plan's batches")
    return {"shards": manifest["shards"]}


def _label_records(loaded: LoadedModel, docs: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict]:
    from memprobe.labels import label_documents

    records = label_documents(loaded, docs, **settings)
    for record in records:
        record["model"] = loaded.info  # as `memprobe label` writes it
    return records


def _mia_records(loaded: LoadedModel, docs: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict]:
    from memprobe.mia.attacks import score_texts

    return score_texts(loaded, docs, **settings)


RECORD_TASKS = {"label": _label_records, "mia": _mia_records}  # per-document tasks: JSONL parts


def _records_entry(job_dir: Path, plan: dict[str, Any], entry: dict[str, Any], loaded: LoadedModel) -> dict:
    from memprobe.distributed.plan import file_sha256

    _tokenized(loaded, plan, entry)  # the same tokens as the plan's, or a clear error
    _maybe_fault(job_dir, entry["index"])
    records = RECORD_TASKS[plan["task"]](loaded, _documents(plan, entry), plan["settings"])
    path = write_jsonl(records_part(job_dir, entry["index"]), records)
    return {"sha256": file_sha256(path), "n_records": len(records)}
