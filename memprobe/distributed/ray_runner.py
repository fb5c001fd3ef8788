"""Run plan entries on Ray Data: one entry per call of a pool of actors, each holding the model once.

Why Ray Data: it is the batch-inference engine people already operate, and the same code runs on a
laptop (`ray.init(num_cpus=2)`, started here) and on a cluster (`--address`). Actors claim a
fraction of a CPU (on a small machine Ray Data can hang when actors hold every CPU), and Ray
restarts an actor that dies and retries its entry (Ray Data's default `max_restarts` and
`max_task_retries`); the shard function resumes the entry from its last committed batch and refuses
an entry that has already killed its worker `shard.MAX_ATTEMPTS` times. The job directory must be on storage
every worker sees.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError

CONNECT_TIMEOUT_S = 5.0


class EntryWorker:
    """A Ray Data callable class: the plan is read once per actor, the model on its first entry.

    A MemprobeError comes back as a record, not an exception: Ray keeps only its traceback text,
    and the other entries still finish, so a rerun after the fix computes only the failed ones.
    """

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self.plan: dict[str, Any] | None = None

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from memprobe.distributed.plan import read_plan
        from memprobe.distributed.shard import run_entry

        records = []
        for i in batch["entry"]:
            try:
                self.plan = self.plan or read_plan(self.job_dir)
                records.append(run_entry(self.job_dir, self.plan, int(i)))
            except MemprobeError as exc:
                records.append({"entry": int(i), "status": "error", "error": str(exc),
                                "pid": os.getpid(), "host": socket.gethostname()})
        return {"record": [json.dumps(r) for r in records]}


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when `address` (host:port or ray://host:port) does not answer."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise MemprobeError(
            f"cannot reach a Ray cluster at --address {address} ({exc}); start one with `ray start --head` "
            "and pass its address (host:port, or ray://host:10001), or omit --address to run on this machine"
        ) from exc


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, reuse the Ray of this process, or start a local one."""
    import ray

    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MemprobeError(f"cannot start or join Ray ({address or 'local'}): {exc}") from exc


def run_with_ray(job_dir: str | Path, entries: list[int], *, workers: int = 2, address: str | None = None,
                 gpus_per_worker: float = 0.0, cpus_per_worker: float = 0.5) -> list[dict[str, Any]]:
    """Run plan entries `entries` of the job in `job_dir` on `workers` Ray actors; their records."""
    if not entries:
        return []
    if workers < 1:
        raise MemprobeError(f"--workers must be at least 1, got {workers}")
    import ray
    import ray.data

    ensure_ray(address)
    env = {k: v for k, v in os.environ.items() if k.startswith("MEMPROBE_")}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    dataset = ray.data.from_items([{"entry": i} for i in entries]).map_batches(
        EntryWorker,
        fn_constructor_kwargs={"job_dir": str(Path(job_dir).absolute())},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(entries))),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        runtime_env={"env_vars": env} if env else None,
    )
    try:
        rows = dataset.take_all()
    except Exception as exc:  # Ray wraps worker errors in its own exception types
        raise MemprobeError(
            f"the Ray job failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "re-run the same command: finished entries are kept"
        ) from exc
    records = sorted((json.loads(r["record"]) for r in rows), key=lambda r: r["entry"])
    errors = [r for r in records if r["status"] == "error"]
    if errors:
        first = errors[0]
        raise MemprobeError(
            f"{len(errors)} of {len(records)} entries failed on Ray workers; entry {first['entry']} on "
            f"{first['host']}: {first['error']}"
        )
    return records
