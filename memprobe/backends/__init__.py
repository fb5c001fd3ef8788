"""Backends: the only code that runs a model to read its internals.

Every backend takes token ids (tokenised once, by memprobe) and returns {site: (batch, seq, width)}:
- `hooks`: plain forward hooks on the HF model (fastest; stops after the last needed layer);
- `lens`: TransformerLens 4.x `TransformerBridge` (it mutates the HF model it wraps);
- `nnsight`: nnsight 0.8 `TransformersModel`.
A model object wrapped by one of TransformerLens/nnsight is never handed to the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel

BACKENDS = ("hooks", "lens", "nnsight")


class Backend(ABC):
    """Runs one model and returns the activations of the requested sites."""

    name: str = ""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @abstractmethod
    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sites: list[str]
    ) -> dict[str, torch.Tensor]:
        """Activations {site: (batch, seq, width)} for already-resolved sites, in float32."""

    def _claim(self, owner: str) -> None:
        """Mark the HF model as wrapped by `owner`; refuse a model another wrapper already mutated."""
        model = self.loaded.model
        holder = getattr(model, "_memprobe_wrapped_by", None)
        if holder not in (None, owner):
            raise MemprobeError(
                f"this model object is already wrapped by {holder}; wrapping it with {owner} too would "
                "mix their in-place changes. Load the model again (memprobe.models.load_model) for "
                f"the {owner} backend."
            )
        model._memprobe_wrapped_by = owner


def make_backend(kind: str, loaded: LoadedModel) -> Backend:
    """Build the backend named `kind` ('hooks', 'lens' or 'nnsight') on a loaded model."""
    if kind == "hooks":
        from memprobe.backends.torch_hooks import HooksBackend

        return HooksBackend(loaded)
    if kind == "lens":
        from memprobe.backends.lens import LensBackend

        return LensBackend(loaded)
    if kind == "nnsight":
        from memprobe.backends.sight import SightBackend

        return SightBackend(loaded)
    raise MemprobeError(f"unknown backend '{kind}': choose one of {', '.join(BACKENDS)}")
