"""The C kernel behind PSMI (`psmi_kernel.c`), built once per machine with the system C compiler.

Why: the per-element work of PSMI (C Gaussian log-densities per projected value and their log-sum-exp)
costs more than the projection matmul when done with torch ops. The C kernel does it in one pass over the
projection with vectorised polynomial exp2/log2. It is compiled at first use into the memprobe cache, under
a name keyed by the source, the flags and the CPU, and moved into place only once complete, so a half-built
library is never loaded. Without a compiler `load()` returns None and PSMI uses plain torch ops (same
values, slower). Calls go through ctypes, which drops the GIL, so row blocks run in parallel on threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from memprobe.io import atomic_path
from memprobe.models import CACHE_DIR

SOURCE = Path(__file__).with_name("psmi_kernel.c")
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-shared", "-fPIC"]
_LOADED: list = []  # [library] once loaded, [None] once a build failed in this process
_MIN_ROWS_PER_THREAD = 256


def _cpu_key() -> str:
    """The CPU's identity for the cache name: -march=native code must not run on a different CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _library_path(compiler: str) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, _cpu_key()]).encode())
    return CACHE_DIR / "kernels" / f"psmi-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    with atomic_path(target) as tmp:  # other processes see no library or a whole one
        subprocess.run([compiler, *FLAGS, "-o", str(tmp), str(SOURCE)], check=True, capture_output=True,
                       timeout=120)


def load() -> ctypes.CDLL | None:
    """The compiled kernel (building it on first use), or None when no C compiler can build it."""
    if _LOADED:
        return _LOADED[0]
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    lib = None
    if compiler:
        target = _library_path(compiler)
        try:
            if not target.exists():
                _build(compiler, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError):
            lib = None
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.class_square_sums.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
        lib.log_ratio_sums.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr]
        lib.class_square_sums.restype = lib.log_ratio_sums.restype = None
    _LOADED.append(lib)
    return lib


def _row_blocks(n: int) -> list[slice]:
    threads = max(1, min(torch.get_num_threads(), n // _MIN_ROWS_PER_THREAD))
    step = -(-n // threads)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _run(calls: list) -> None:
    if len(calls) == 1:
        calls[0]()
        return
    with ThreadPoolExecutor(len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("native PSMI kernel needs contiguous CPU tensors")


def class_square_sums(lib: ctypes.CDLL, z: torch.Tensor, own: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """(C, k) sums over the rows of each class of (z - mu[class])^2; z float32 (n, k), own int64 (n,)."""
    _check(z, own, mu)
    n, k = z.shape
    blocks = _row_blocks(n)
    parts = torch.zeros(len(blocks), *mu.shape, dtype=torch.float32)  # one accumulator per thread
    _run([lambda b=b, i=i: lib.class_square_sums(z[b].data_ptr(), b.stop - b.start, k, own[b].data_ptr(),
                                                 mu.data_ptr(), parts[i].data_ptr())
          for i, b in enumerate(blocks)])
    return parts.sum(0)


def log_ratio_sums(lib: ctypes.CDLL, z: torch.Tensor, own: torch.Tensor, mu: torch.Tensor, inv2: torch.Tensor,
                   a2: torch.Tensor) -> torch.Tensor:
    """Per row, sum over columns of log2 N(z | own) + log2 prior_own - log2 sum_c prior_c N(z | c).

    inv2 = -log2(e) / (2 var), a2 = log2 prior - log2(var) / 2, both (C, k).
    """
    a2 = (a2 - a2.amax(0)).contiguous()  # the kernel's one-pass form needs max_c a2 = 0 (same result)
    _check(z, own, mu, inv2, a2)
    n, k = z.shape
    n_classes = mu.shape[0]
    out = torch.zeros(n, dtype=torch.float32)
    blocks = _row_blocks(n)
    work = torch.empty(len(blocks), (n_classes + 2) * k, dtype=torch.float32)
    _run([lambda b=b, i=i: lib.log_ratio_sums(z[b].data_ptr(), b.stop - b.start, k, own[b].data_ptr(),
                                              mu.data_ptr(), inv2.data_ptr(), a2.data_ptr(), n_classes,
                                              out[b].data_ptr(), work[i].data_ptr())
          for i, b in enumerate(blocks)])
    return out
