"""Wall time and peak resident memory of one stage of a process (a defense's build, a benchmark's peer).

Why /proc: on Linux `clear_refs` 5 resets the peak-RSS counter (VmHWM), so a stage's own peak can be
read inside a long process; getrusage's ru_maxrss only ever grows (and survives exec). Where /proc
is missing the peak is the process's lifetime peak, and `peak_is_lifetime` says so.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float | None:
    try:
        lines = _STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> float | None:
    """Reset the peak-RSS counter where Linux allows it; returns the current RSS in MiB (None: unknown)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak RSS in MiB since the last reset (VmHWM), else the lifetime peak (ru_maxrss)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage_cost() -> Iterator[dict[str, Any]]:
    """`with stage_cost() as cost:` fills cost with seconds, peak_rss_mb and rss_before_mb."""
    cost: dict[str, Any] = {"rss_before_mb": reset_peak_rss(), "peak_is_lifetime": _status_mb("VmHWM") is None}
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost["seconds"] = time.perf_counter() - start
        cost["peak_rss_mb"] = peak_rss_mb()
