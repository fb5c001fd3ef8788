"""A distributed job: plan, run the unfinished entries on an engine, merge; the same for every engine.

Why the engine is a parameter and nothing more: the plan fixes what is computed and the merge fixes
the output, so `process` (in this process, one entry after another), `ray` (Ray Data actors) and
`torchrun` (a static split by rank) only decide where entries run. A rerun computes exactly the
entries without a verified output; what each run did goes to `runs/` beside the plan, outside the
compared bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memprobe.distributed.engines import ENGINES, EngineOptions
from memprobe.distributed.merge import merge_capture, merge_records, merged_store, unfinished
from memprobe.distributed.plan import PLAN_FILE, capture_plan, file_sha256, records_plan, write_plan
from memprobe.distributed.remote import fetch, is_url, publish, published, read_published
from memprobe.distributed.shard import (
    PARTS,
    RUNS,
    attempts_file,
    part_dir,
    part_url,
    remember_model,
    run_entry,
)
from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel, load_model
from memprobe.results import provenance, write_json


@dataclass
class JobReport:
    """What one run of a job did: entries computed here, entries found finished, worker records."""

    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def run_entries(job_dir: Path, plan: dict[str, Any], todo: list[int], options: EngineOptions) -> list[dict]:
    """Run plan entries `todo` on the chosen engine; returns one record per entry."""
    if options.engine == "process":
        return [run_entry(job_dir, plan, i) for i in todo]
    if options.engine == "ray":
        from memprobe.distributed.ray_runner import run_with_ray

        return run_with_ray(job_dir, todo, workers=options.workers, address=options.address,
                            gpus_per_worker=options.gpus_per_worker, cpus_per_worker=options.cpus_per_worker)
    raise MemprobeError(f"unknown engine {options.engine!r}: choose one of {', '.join(ENGINES)}")


def run_job(job_dir: str | Path, make_plan: Callable[[], dict[str, Any]], merge: Callable[[dict[str, Any]], Any],
            options: EngineOptions, *, already_merged: Callable[[dict[str, Any]], bool]) -> tuple[Any, JobReport]:
    """Plan into `job_dir` (or accept the same plan there), run what is unfinished, merge."""
    if options.engine == "torchrun":
        from memprobe.distributed.torchrun import run_ranks

        return run_ranks(job_dir, make_plan, merge, already_merged=already_merged)
    job_dir = Path(job_dir)
    started = time.perf_counter()
    check_job_dir(job_dir)
    plan = make_plan()
    write_plan(job_dir, plan)
    report = JobReport()
    url = plan.get("publish")
    if url:
        fetch_published(job_dir, plan, url)
    if already_merged(plan):
        report.skipped = [e["index"] for e in plan["entries"]]
        return merge(plan), report
    todo = unfinished(job_dir, plan)
    for i in todo:
        attempts_file(job_dir, i).unlink(missing_ok=True)  # a new run: each entry gets fresh attempts
    report.skipped = sorted(set(range(len(plan["entries"]))) - set(todo))
    report.records = run_entries(job_dir, plan, todo, options)
    report.computed = sorted(r["entry"] for r in report.records if r["status"] == "computed")
    result = merge(plan)
    report.seconds = time.perf_counter() - started
    record_run(job_dir, report, options.engine)
    if url:
        publish(job_dir, url)  # the merged store, its plan and runs; the marker goes last
    return result, report


def fetch_published(job_dir: Path, plan: dict[str, Any], url: str) -> None:
    """Bring back what an earlier run published: the merged store, else each finished part."""
    if published(url) is not None:
        remote_plan = json.loads(read_published(url, PLAN_FILE))
        if remote_plan.get("sha256") != plan["sha256"]:
            raise MemprobeError(f"{url} holds the output of a different job; choose another URL or delete it")
        fetch(url, job_dir)
        return
    for i in unfinished(job_dir, plan):
        if published(part_url(url, i)) is not None:
            shutil.rmtree(part_dir(job_dir, i), ignore_errors=True)
            fetch(part_url(url, i), part_dir(job_dir, i))


def model_for_workers(model_ref: str) -> str:
    """A local model path made absolute (workers run in other directories); names stay names."""
    path = Path(model_ref)
    return str(path.absolute()) if path.exists() and not path.is_absolute() else model_ref


def work_dir_for(url: str) -> Path:
    """The local directory a job publishing to `url` works in, unless the caller names one."""
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / "memprobe-jobs" / hashlib.sha256(url.encode()).hexdigest()[:16]


def record_run(job_dir: Path, report: JobReport, engine: str) -> Path:
    name = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json"
    return write_json(Path(job_dir) / RUNS / name, {
        "engine": engine, "computed": report.computed, "skipped": report.skipped, "seconds": report.seconds,
        "workers": sorted({(r.get("host"), r.get("pid")) for r in report.records if "pid" in r}),
        "provenance": provenance(),
    })


def check_job_dir(job_dir: Path) -> None:
    """Refuse a directory that holds something other than this kind of job (e.g. a plain capture)."""
    if job_dir.exists() and not job_dir.is_dir():
        raise MemprobeError(f"{job_dir} is a file, not a directory; choose another output directory")
    if job_dir.is_dir() and any(job_dir.iterdir()) and not (job_dir / PLAN_FILE).exists():
        raise MemprobeError(
            f"{job_dir} is not empty and holds no distributed plan ({PLAN_FILE}); choose an empty "
            "directory (a store made without --engine cannot be continued by a distributed run)"
        )


def capture_job(model_ref: str, input_path: str | Path, sites: str | list[str], out: str | Path, *,
                backend: str = "hooks", dtype: str = "float32", batch_tokens: int = 2048,
                entry_tokens: int = 65536, truncate: bool = False, token_stats: bool = False, threads: int = 1,
                options: EngineOptions | None = None, loaded: LoadedModel | None = None,
                work_dir: str | Path | None = None):
    """`memprobe capture` as a distributed job: the store at `out` equals a one-process capture.

    `out` may be an fsspec URL (file://, memory://): the job then runs in `work_dir` (default: a
    directory under the system temp keyed by the URL; with Ray it must be shared by the workers),
    publishes each finished part and finally the merged store there, and returns the local store.
    """
    options = options or EngineOptions()
    model_ref = model_for_workers(model_ref)
    url = str(out) if is_url(out) else None
    out = Path(work_dir) if work_dir else work_dir_for(url) if url else Path(out)

    def make_plan() -> dict[str, Any]:
        model = loaded or load_model(model_ref)
        if options.engine in ("process", "torchrun"):
            remember_model(model_ref, model)  # the planner's model is this process's worker model
        return capture_plan(model, model_ref, input_path, sites, backend=backend, dtype=dtype,
                            batch_tokens=batch_tokens, entry_tokens=entry_tokens, truncate=truncate,
                            token_stats=token_stats, threads=threads, publish=url)

    def already_merged(plan: dict[str, Any]) -> bool:
        return merged_store(out, plan) is not None

    return run_job(out, make_plan, lambda plan: merge_capture(out, plan), options, already_merged=already_merged)


def label_job(model_ref: str, input_path: str | Path, output: str | Path, *, min_prob: float = 0.5,
              prefix_len: int = 32, suffix_len: int = 32, batch_size: int = 8, entry_tokens: int = 65536,
              threads: int = 1, options: EngineOptions | None = None, loaded: LoadedModel | None = None):
    """`memprobe label` as a distributed job; its plan, parts and runs live in `<output>.job/`."""
    settings = {"min_prob": min_prob, "prefix_len": prefix_len, "suffix_len": suffix_len, "batch_size": batch_size}
    return records_job("label", model_ref, input_path, output, settings, entry_tokens=entry_tokens,
                       threads=threads, options=options, loaded=loaded)


def mia_job(model_ref: str, input_path: str | Path, output: str | Path, *, k: float = 0.2, batch_size: int = 8,
            entry_tokens: int = 65536, threads: int = 1, options: EngineOptions | None = None,
            loaded: LoadedModel | None = None):
    """Reference-free membership scores (`memprobe.mia.attacks.score_texts`) as a distributed job."""
    return records_job("mia", model_ref, input_path, output, {"k": k, "batch_size": batch_size},
                       entry_tokens=entry_tokens, threads=threads, options=options, loaded=loaded)


def records_job(task: str, model_ref: str, input_path: str | Path, output: str | Path, settings: dict[str, Any],
                *, entry_tokens: int = 65536, threads: int = 1, options: EngineOptions | None = None,
                loaded: LoadedModel | None = None):
    """A per-document task whose records are merged into one JSONL at `output`, in input order."""
    options = options or EngineOptions()
    model_ref = model_for_workers(model_ref)
    if is_url(output):
        raise MemprobeError(f"{task} output {output} is a URL: per-document outputs are written to local paths only")
    output = Path(output)
    job_dir = output.with_name(output.name + ".job")

    def make_plan() -> dict[str, Any]:
        model = loaded or load_model(model_ref)
        if options.engine in ("process", "torchrun"):
            remember_model(model_ref, model)
        return records_plan(task, model, model_ref, input_path, settings, entry_tokens=entry_tokens,
                            threads=threads)

    merged = job_dir / "merged.json"  # plan hash and output hash of a finished merge

    def already_merged(plan: dict[str, Any]) -> bool:
        if not merged.is_file() or not output.is_file():
            return False
        done = json.loads(merged.read_text())
        return done == {"plan_sha256": plan["sha256"], "sha256": file_sha256(output)}

    def merge(plan: dict[str, Any]) -> Path:
        if already_merged(plan):
            return output
        path = merge_records(job_dir, plan, output)
        write_json(merged, {"plan_sha256": plan["sha256"], "sha256": file_sha256(path)})
        shutil.rmtree(job_dir / PARTS, ignore_errors=True)
        return path

    return run_job(job_dir, make_plan, merge, options, already_merged=already_merged)
