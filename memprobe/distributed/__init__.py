"""Scale-out: a deterministic plan of whole-document shards, a pure shard function, a merge into one
ordinary output, and engines that only decide where entries run (this process, Ray Data, torchrun).

Modules: `plan` (entries, content-hashed plan file) · `shard` (the shard function, worker caches) ·
`merge` (parts to one store / one JSONL) · `engines` (where entries run) · `job` (plan, run, merge
for any engine) · `ray_runner` · `torchrun`; the --engine options are `memprobe.cli.distributed`.
Importing this package loads nothing heavy.
"""
