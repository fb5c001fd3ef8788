"""Where a job's entries run: the engine names and the options of each (kept light, so the
`--engine` options of `memprobe capture` and `memprobe label` are built without loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

ENGINES = ("process", "ray", "torchrun")


@dataclass
class EngineOptions:
    """Where entries run: the engine and, for Ray, the cluster and the size of each worker."""

    engine: str = "process"
    workers: int = field(default=2, metadata={"help": "Ray actors"})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join (host:port or ray://host:10001; default: start one here)"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs each Ray actor claims"})
    cpus_per_worker: float = field(default=0.5, metadata={
        "help": "CPUs each Ray actor claims (fractional: Ray Data can hang when actors claim every CPU)"})
