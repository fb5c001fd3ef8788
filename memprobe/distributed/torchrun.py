"""Run a distributed job under torchrun: a static split of the unfinished entries by rank.

    torchrun --nproc_per_node 4 -m memprobe.distributed.torchrun capture --model M --input I --sites S --out X
    (the same as: torchrun ... -m memprobe.cli capture --engine torchrun ...)

Rank 0 plans (the others wait), every rank runs entries `todo[rank::world]`, and rank 0 merges after
a barrier. The process group is gloo (the ranks only exchange small Python objects), so it works on
CPU-only machines; each rank uses its local GPU when there is one (LOCAL_RANK). A rank's error
reaches rank 0, which raises it; a rerun skips the entries already finished.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError

BARRIER_TIMEOUT = timedelta(days=2)  # ranks wait at the barrier for the slowest one's entries


def rank_and_world() -> tuple[int, int]:
    """RANK and WORLD_SIZE as torchrun sets them, or a clear error when not launched by it."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError) as exc:
        raise MemprobeError(
            "--engine torchrun needs RANK and WORLD_SIZE: launch with `torchrun --nproc_per_node N -m "
            "memprobe.distributed.torchrun capture ...`, or choose --engine process or ray"
        ) from exc


def _shared(dist, rank: int, make: Callable[[], Any]) -> Any:
    """`make()` on rank 0, broadcast to all; an error there is raised on every rank."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [("ok", make())]
        except Exception as exc:  # any error: the other ranks must not wait for rank 0 forever
            box = [("error", str(exc) if isinstance(exc, MemprobeError) else f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise MemprobeError(value)
    return value


def run_ranks(job_dir: str | Path, make_plan: Callable[[], dict[str, Any]], merge: Callable[[dict[str, Any]], Any],
              *, already_merged: Callable[[dict[str, Any]], bool]):
    """This rank's part of the job; rank 0 returns the merged result, the others None."""
    import torch
    import torch.distributed as dist

    from memprobe.distributed.job import JobReport, check_job_dir, fetch_published, record_run
    from memprobe.distributed.merge import unfinished
    from memprobe.distributed.plan import read_plan, write_plan
    from memprobe.distributed.remote import publish
    from memprobe.distributed.shard import attempts_file, run_entry

    rank, world = rank_and_world()
    job_dir = Path(job_dir)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    started = time.perf_counter()
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        def plan_and_todo() -> tuple[bool, list[int]]:
            check_job_dir(job_dir)
            plan = make_plan()
            write_plan(job_dir, plan)
            if plan.get("publish"):
                fetch_published(job_dir, plan, plan["publish"])
            if already_merged(plan):
                return True, []
            todo = unfinished(job_dir, plan)
            for i in todo:
                attempts_file(job_dir, i).unlink(missing_ok=True)
            return False, todo

        merged, todo = _shared(dist, rank, plan_and_todo)
        plan = read_plan(job_dir)
        mine = todo[rank::world]
        try:
            outcome: Any = ("ok", [run_entry(job_dir, plan, i) for i in mine])
        except Exception as exc:  # reported through the gather, so no rank waits at it forever
            outcome = ("error", f"rank {rank}: {exc if isinstance(exc, MemprobeError) else repr(exc)}")
        outcomes: list[Any] = [None] * world if rank == 0 else None
        dist.gather_object(outcome, outcomes, dst=0)

        merged_result: dict[str, Any] = {}

        def finish() -> JobReport:
            errors = [value for kind, value in outcomes if kind == "error"]
            if errors:
                raise MemprobeError("; ".join(errors))
            records = sorted((r for _, value in outcomes for r in value), key=lambda r: r["entry"])
            report = JobReport(computed=sorted(r["entry"] for r in records if r["status"] == "computed"),
                               skipped=sorted(set(range(len(plan["entries"]))) - set(todo)), records=records)
            merged_result["result"] = merge(plan)
            report.seconds = time.perf_counter() - started
            if not merged:
                record_run(job_dir, report, f"torchrun x{world}")
                if plan.get("publish"):
                    publish(job_dir, plan["publish"])
            return report

        report = _shared(dist, rank, finish)
        return merged_result.get("result"), report
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """`memprobe <capture|label> ... --engine torchrun`, for `torchrun -m memprobe.distributed.torchrun`."""
    from memprobe.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    return cli_main([*args, "--engine", "torchrun"])


if __name__ == "__main__":
    sys.exit(main())
