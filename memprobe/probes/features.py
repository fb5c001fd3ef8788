"""What a probe reads: one position's activation, or the mean over a short causal window of them.

Why a window: memorization is a state the model is in while it recites a text, not a property of one
token. Averaging the activations at the last `window` positions before a token (never past the start
of its text, never after the position that predicts it) keeps that state and averages away token-level
noise. window=1 is Slonski's per-token probe. Both the training path (rows of an activation store) and
the scoring path (a batch of sequences) go through this module, so they compute the same feature.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memprobe.errors import MemprobeError


def _check_window(window: int) -> None:
    if not isinstance(window, int | np.integer) or window < 1:
        raise MemprobeError(f"window must be a positive integer (1 = the position's own activation), not {window!r}")


def read_rows(store: Any, site: str, rows: np.ndarray, *, window: int = 1,
              doc_start: np.ndarray | None = None) -> torch.Tensor:
    """Float32 features of `rows` at `site`, reading only the store range that covers them.

    window > 1: each row's feature is the mean over that row and the window - 1 rows before it, cut at
    `doc_start` (the first store row of the row's document), which is then required.
    """
    _check_window(window)
    rows = np.asarray(rows, dtype=np.int64)
    if window == 1:
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return store.read(site, lo, hi)[torch.as_tensor(rows - lo)].float()
    if doc_start is None or len(doc_start) != len(rows):
        raise MemprobeError("a window > 1 needs doc_start (the first store row of each row's document, e.g. "
                            "TokenSet.store_doc_starts) so that windows stay inside their text")
    doc_start = np.asarray(doc_start, dtype=np.int64)
    if (doc_start > rows).any():
        raise MemprobeError("doc_start lies after its row: pass each row's own document start")
    first = np.maximum(doc_start, rows - window + 1)
    lo, hi = int(first.min()), int(rows.max()) + 1
    X = store.read(site, lo, hi)
    total = torch.zeros(len(rows), X.shape[1], dtype=torch.float32)
    for back in range(window):
        src = rows - back
        ok = src >= first
        if not ok.any():
            break
        total[torch.as_tensor(ok)] += X[torch.as_tensor(src[ok] - lo)].float()
    return total / torch.as_tensor(rows - first + 1, dtype=torch.float32)[:, None]


def window_mean(acts: torch.Tensor, window: int) -> torch.Tensor:
    """(batch, seq, d) -> the mean over positions max(0, t - window + 1) .. t at each t (right-padded
    batches: a position never averages over the padding after it). Same feature as `read_rows`."""
    _check_window(window)
    if window == 1:
        return acts
    c = torch.cumsum(acts.double(), dim=1)
    shifted = torch.zeros_like(c)
    shifted[:, window:] = c[:, :-window]
    count = torch.clamp(torch.arange(1, acts.shape[1] + 1, dtype=torch.float64), max=window)
    return ((c - shifted) / count[None, :, None]).to(acts.dtype)
