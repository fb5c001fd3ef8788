"""The compute precision of forward passes: float32, or bfloat16 autocast where bfloat16 is native.

Why: on a CPU with AVX512-BF16 or AMX (as here) and on CUDA, the blocks' matmuls run about twice as
fast in bfloat16 autocast: teacher-forced labels of the bundled corpus on smollm2 take 43.8 s in
float32 and 22.8 s with the blocks in bfloat16 and the vocabulary head in float32, with the same
memorized texts and 69 of 22,421 token labels flipped (0.3%; `benchmarks/bench_precision.py`). The head
stays float32 because its logits decide the labels and the membership scores; parameters, stores and
every statistic stay float32 (the store's dtype is its own setting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from memprobe.errors import MemprobeError

PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX,
    where oneDNN runs it ~2.5x faster than float32 here); elsewhere bfloat16 is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bfloat16' where `device` has native bfloat16, else 'float32'."""
    if precision not in PRECISIONS:
        raise MemprobeError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


def _float32_head(head: nn.Module, forward: Callable[..., Any], device_type: str) -> Callable[..., Any]:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, enabled=False):
            return forward(x.to(head.weight.dtype), *args, **kwargs)

    return run


@contextmanager
def compute_precision(precision: str, *models: nn.Module) -> Iterator[str]:
    """Run the forward passes inside the block in `precision` (see `resolve_precision`); the vocabulary
    head of each of `models` stays in its own dtype. Yields the precision used."""
    device = next((p.device for m in models for p in m.parameters()), torch.device("cpu"))
    used = resolve_precision(precision, device)
    if used == "float32":
        yield used
        return
    heads = [h for h in (getattr(m, "get_output_embeddings", lambda: None)() for m in models) if h is not None]
    patched = [(h, h.__dict__.get("forward")) for h in heads]
    for h in heads:
        h.forward = _float32_head(h, h.forward, device.type)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield used
    finally:
        for h, own in patched:
            if own is None:
                del h.forward
            else:
                h.forward = own
