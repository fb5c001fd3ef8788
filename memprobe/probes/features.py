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


_CHUNK_BYTES = 8 * 2**20  # per store read: temporaries this small are reused by malloc, not page-faulted anew


def read_rows(store: Any, site: str, rows: np.ndarray, *, window: int = 1,
              doc_start: np.ndarray | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 features of `rows` (any order) at `site`, reading only the store range that covers them.

    window > 1: each row's feature is the mean over that row and the window - 1 rows before it, cut at
    `doc_start` (the first store row of the row's document), which is then required.
    out: a float32 (len(rows), width) tensor to fill and return. Why: a fresh tensor of a site's rows
    is hundreds of MB whose first touch (page faults) costs ~10x the copy itself; a sweep reuses one.
    """
    _check_window(window)
    rows = np.asarray(rows, dtype=np.int64)
    width = int(store.widths[site])
    if out is None:
        out = torch.empty(len(rows), width, dtype=torch.float32)
    elif out.shape != (len(rows), width) or out.dtype != torch.float32:
        raise MemprobeError(f"out must be a float32 tensor of shape {(len(rows), width)} for {site!r}, "
                            f"not {out.dtype} {tuple(out.shape)}")
    if not len(rows):
        return out
    if window == 1:
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        step = max(1, _CHUNK_BYTES // (2 * width))
        i = 0
        while i < len(ordered):  # store ranges of <= step rows: small temporaries, one read per range
            lo = int(ordered[i])
            j = int(np.searchsorted(ordered, lo + step, side="left"))
            raw = store.read(site, lo, int(ordered[j - 1]) + 1)
            picked = raw[torch.as_tensor(ordered[i:j] - lo)]
            dest = order[i:j]
            if (np.diff(dest) == 1).all():  # rows asked for in store order: a plain slice
                out[int(dest[0]) : int(dest[-1]) + 1].copy_(picked)
            else:
                out.index_copy_(0, torch.as_tensor(dest), picked.float())
            i = j
        return out
    if doc_start is None or len(doc_start) != len(rows):
        raise MemprobeError("a window > 1 needs doc_start (the first store row of each row's document, e.g. "
                            "TokenSet.store_doc_starts) so that windows stay inside their text")
    doc_start = np.asarray(doc_start, dtype=np.int64)
    if (doc_start > rows).any():
        raise MemprobeError("doc_start lies after its row: pass each row's own document start")
    first = np.maximum(doc_start, rows - window + 1)
    lo, hi = int(first.min()), int(rows.max()) + 1
    X = store.read(site, lo, hi)
    total = out.zero_()
    for back in range(window):
        src = rows - back
        ok = src >= first
        if not ok.any():
            break
        total[torch.as_tensor(ok)] += X[torch.as_tensor(src[ok] - lo)].float()
    return total.div_(torch.as_tensor(rows - first + 1, dtype=torch.float32)[:, None])


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
