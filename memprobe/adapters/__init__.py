"""Family adapters: the only code that names a Hugging Face family's module paths."""

from memprobe.adapters.base import BLOCK_KINDS, Adapter
from memprobe.adapters.registry import FAMILIES, adapter_for, family_of

__all__ = ["BLOCK_KINDS", "FAMILIES", "Adapter", "adapter_for", "family_of"]
