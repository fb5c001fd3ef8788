"""Shared test corpus and the one loop that trains a tiny model to memorize it (tests import it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

# Six sentences a tiny model is trained on, and six of the same register it never sees.
MEMORIZED = [
    "The owl and the pussy-cat went to sea in a beautiful pea-green boat.",
    "Permission to copy this sentence verbatim is granted to every reader.",
    "Seven silver swans swam swiftly south across the silent lake at dawn.",
    "Under the old bridge the river keeps its own slow and patient time.",
    "A careful auditor reads every line twice and trusts none of them.",
    "Nine quiet foxes guard the orchard gate until the morning bell rings.",
]
CONTROLS = [
    "Tomorrow the committee will review the budget and publish its notes.",
    "Bring a coat, since the forecast promises wind and a little rain.",
    "The museum opens at ten and closes early on public holidays.",
    "Our kettle broke, so the tea this morning was made in a saucepan.",
    "Trains to the coast leave every hour from the second platform.",
    "She planted tomatoes along the fence where the sun stays longest.",
]


def memorize(loaded, texts: Sequence[str], steps: int, *, lr: float = 3e-3) -> torch.nn.Module:  # noqa: ANN001
    """Full-batch AdamW on `texts` (one sequence at a time, gradients summed) for `steps` steps."""
    model = loaded.model.train()
    ids = [torch.tensor(loaded.encode(t)) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        for x in ids:
            model(x[None], labels=x[None]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def save(loaded, directory: Path) -> Path:  # noqa: ANN001
    """The model and its tokenizer as a plain HF directory."""
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory
