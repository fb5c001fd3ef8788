"""TransformerLens 4.x backend: `TransformerBridge.boot_transformers` over the loaded HF model.

The bridge mutates the HF model in place (and forces eager attention), so this backend claims the
model object; use a freshly loaded model for any other wrapper.
"""

from __future__ import annotations

import torch

from memprobe.adapters import adapter_for
from memprobe.backends import Backend
from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.sites import catalog, layer_of


class LensBackend(Backend):
    """Reads canonical sites with `run_with_cache(names_filter=..., stop_at_layer=...)`."""

    name = "lens"

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self._claim("transformer-lens")
        from transformer_lens.model_bridge import TransformerBridge

        self.adapter = adapter_for(loaded.model)  # before the bridge rewraps the model's modules
        try:
            self.bridge = TransformerBridge.boot_transformers(
                loaded.name, hf_model=loaded.model, tokenizer=loaded.tokenizer, device=loaded.device
            )
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise MemprobeError(
                f"TransformerLens cannot wrap {type(loaded.model).__name__}: {exc}. Use --backend hooks or nnsight."
            ) from exc

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sites: list[str]
    ) -> dict[str, torch.Tensor]:
        canonical = set(catalog(self.adapter))
        raw = [s for s in sites if s not in canonical]
        if raw:
            raise MemprobeError(
                f"the lens backend reads TransformerLens hook names only, not module paths {raw}: "
                "use --backend hooks or nnsight for raw module paths"
            )
        layers = [layer_of(s) for s in sites]
        needs_all = any(li is None and s != "hook_embed" for li, s in zip(layers, sites, strict=True))
        last = max((li for li in layers if li is not None), default=-1)
        stop = None if needs_all or last + 1 >= self.adapter.n_layers else last + 1
        with torch.no_grad():
            _, cache = self.bridge.run_with_cache(
                input_ids, names_filter=list(sites), stop_at_layer=stop, attention_mask=attention_mask,
                return_cache_object=False,
            )
        return {s: cache[s] for s in sites}
