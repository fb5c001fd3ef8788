"""Write experiment results as JSON that records how they were made (seed, versions, command)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memprobe.io.atomic import atomic_write


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN/inf; None says "undefined"
    if isinstance(value, Path):
        return str(value)
    return value


def provenance(seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """What produced a result: script and arguments, seed, library versions, machine."""
    from memprobe import __version__

    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seed": seed,
        "memprobe": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` atomically (memprobe.io.atomic_write) so a reader never sees half a file."""
    return atomic_write(path, json.dumps(_plain(payload), indent=2, sort_keys=False) + "\n")


def save_results(path: str | Path, results: dict[str, Any], *, seed: int | None, **extra: Any) -> Path:
    """Save `results` under "results" with a "provenance" block beside it."""
    return write_json(path, {"provenance": provenance(seed, **extra), "results": results})


def experiment_parser(doc: str | None, root: Path) -> argparse.ArgumentParser:
    """The options every experiment script shares: --quick, --seed, --out (results), --figures."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for tests (point --out/--figures elsewhere)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=root / "experiments" / "results", help="results directory")
    ap.add_argument("--figures", type=Path, default=root / "figures", help="figures directory")
    return ap
