"""Suppression edits (neuron ablation, residual-direction steering) and the runtime hooks that apply them.

Why edits are plain data: one edit object is applied three ways that must agree — as forward hooks on
any HF model, as TransformerLens hooks on a `TransformerBridge`, inside an nnsight trace — and is
baked into the weights by `memprobe.intervene.export`, so a user can check one against another.

- `NeuronEdit`: MLP neurons (the input of the MLP out-projection, site `blocks.{i}.mlp.hook_post`) move a
  fraction `strength` of the way to a target value: 0 (zero ablation) or a per-neuron mean (mean
  ablation). strength 1 removes them; strength 0.5 halves them.
- `DirectionEdit`: every write to the residual stream (token embedding, each attention output, each
  MLP output) loses `strength` times its component along a unit direction d: x -> x - s (x.d) d.
  With strength 1 the residual stream never holds any d component (the "projection out" steer).
- `LowRankEdit`: each chosen layer's MLP output weight gains `strength` x B A (rank r): the MLP output
  becomes W_out h + s B (A h) for the neurons' activations h. Learned by `memprobe.intervene.
  weight_edit` (unlikelihood on memorized tokens, KL to the original model on ordinary text).

Each kind registers itself by name (`@register_edit("neurons")`) with `to_tensors()` and
`from_tensors()`, so `save_edit`/`load_edit` know no kind: a new edit kind is one class, and an
unknown kind in a file is an error listing the known ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from memprobe.adapters import Adapter, adapter_for
from memprobe.errors import MemprobeError
from memprobe.io.atomic import atomic_write

EDIT_KINDS: dict[str, type] = {}
_EditClass = TypeVar("_EditClass", bound=type)


def register_edit(kind: str) -> Callable[[_EditClass], _EditClass]:
    """Class decorator: make an edit kind savable and loadable under `kind` (its `kind` attribute)."""

    def register(cls: _EditClass) -> _EditClass:
        if kind in EDIT_KINDS and EDIT_KINDS[kind] is not cls:
            raise MemprobeError(f"edit kind {kind!r} is already registered by {EDIT_KINDS[kind].__name__}")
        cls.kind = kind
        EDIT_KINDS[kind] = cls
        return cls

    return register


def _by_layer(tensors: dict[str, torch.Tensor], prefix: str) -> dict[int, torch.Tensor]:
    """{layer: tensor} from keys `<prefix>.<layer>`."""
    return {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith(prefix + ".")}


@register_edit("neurons")
@dataclass
class NeuronEdit:
    """Move chosen MLP neurons a fraction `strength` toward `means` (zero when None)."""

    neurons: dict[int, torch.Tensor]  # layer -> int64 neuron indices
    strength: float = 1.0
    means: dict[int, torch.Tensor] | None = None  # layer -> values for those indices (same order)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.neurons = {int(k): torch.as_tensor(v, dtype=torch.long) for k, v in self.neurons.items() if len(v)}
        if self.means is not None:
            self.means = {int(k): torch.as_tensor(v, dtype=torch.float32) for k, v in self.means.items()}
            for layer, idx in self.neurons.items():
                if layer not in self.means or self.means[layer].shape != idx.shape:
                    raise MemprobeError(f"mean ablation needs one mean per chosen neuron (layer {layer})")
        self._vectors: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def apply(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        """Activations (..., d_mlp) of `layer` with the edit applied (a new tensor).

        One fused multiply(-add) with full-width vectors built once per layer/device: the runtime
        hooks cost almost nothing next to the MLP's matrix products."""
        if layer not in self.neurons:
            return acts
        key = (layer, acts.shape[-1], acts.device, acts.dtype)
        if key not in self._vectors:
            idx = self.neurons[layer].to(acts.device)
            scale = torch.ones(acts.shape[-1], device=acts.device, dtype=acts.dtype)
            scale[idx] = 1.0 - self.strength
            shift = None
            if self.means is not None:
                shift = torch.zeros_like(scale)
                shift[idx] = self.strength * self.means[layer].to(acts.device, acts.dtype)
            self._vectors[key] = (scale, shift)
        scale, shift = self._vectors[key]
        return acts * scale if shift is None else torch.addcmul(shift, acts, scale)

    def with_strength(self, strength: float) -> NeuronEdit:
        return NeuronEdit(self.neurons, strength, self.means, dict(self.meta))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"neurons.{layer}": idx.contiguous() for layer, idx in self.neurons.items()}
        if self.means is not None:
            tensors.update({f"means.{layer}": self.means[layer].contiguous() for layer in self.neurons})
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], strength: float, meta: dict) -> NeuronEdit:
        return cls(_by_layer(tensors, "neurons"), strength, _by_layer(tensors, "means") or None, meta)


@register_edit("direction")
@dataclass
class DirectionEdit:
    """Remove `strength` x the component along `direction` from every residual-stream write."""

    direction: torch.Tensor  # (d_model,), normalised on construction
    strength: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = torch.as_tensor(self.direction, dtype=torch.float32).flatten()
        norm = d.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise MemprobeError("a steering direction must be a finite, non-zero vector")
        self.direction = d / norm

    @property
    def size(self) -> int:
        return 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        d = self.direction.to(x.device, x.dtype)
        return x - self.strength * (x @ d)[..., None] * d

    def with_strength(self, strength: float) -> DirectionEdit:
        return DirectionEdit(self.direction, strength, dict(self.meta))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], strength: float, meta: dict) -> DirectionEdit:
        if "direction" not in tensors:
            raise MemprobeError("a direction edit file needs a 'direction' tensor")
        return cls(tensors["direction"], strength, meta)


@register_edit("low-rank")
@dataclass
class LowRankEdit:
    """Add strength x B @ A to the MLP out-projection weight of each layer in `factors`."""

    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A (rank, d_mlp), B (d_model, rank))
    strength: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.factors = {int(k): (torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32))
                        for k, (a, b) in self.factors.items()}
        for layer, (a, b) in self.factors.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise MemprobeError(f"layer {layer}: need A (rank, d_mlp) and B (d_model, rank), got "
                                    f"{tuple(a.shape)} and {tuple(b.shape)}")

    @property
    def size(self) -> int:
        return sum(a.shape[0] for a, _ in self.factors.values())

    def delta(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """What the edit adds to `layer`'s MLP output, given the neurons' activations (..., d_mlp)."""
        a, b = self.factors[layer]
        return self.strength * ((hidden @ a.to(hidden.device, hidden.dtype).T) @ b.to(hidden.device, hidden.dtype).T)

    def weight_delta(self, layer: int) -> torch.Tensor:
        """The (d_model, d_mlp) matrix added to the out-projection weight (as nn.Linear holds it)."""
        a, b = self.factors[layer]
        return self.strength * (b @ a)

    def with_strength(self, strength: float) -> LowRankEdit:
        return LowRankEdit(self.factors, strength, dict(self.meta))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for layer, (a, b) in self.factors.items():
            tensors[f"A.{layer}"], tensors[f"B.{layer}"] = a.contiguous(), b.contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], strength: float, meta: dict) -> LowRankEdit:
        a, b = _by_layer(tensors, "A"), _by_layer(tensors, "B")
        if set(a) != set(b):
            raise MemprobeError(f"a low-rank edit needs A and B for the same layers, got {sorted(a)} and {sorted(b)}")
        return cls({i: (a[i], b[i]) for i in sorted(a)}, strength, meta)


Edit = NeuronEdit | DirectionEdit | LowRankEdit


def save_edit(edit: Edit, path: str | Path) -> Path:
    """Write an edit as one safetensors file (its kind's tensors + a JSON header), atomically."""
    if type(edit) not in EDIT_KINDS.values():
        raise MemprobeError(f"{type(edit).__name__} is not a registered edit kind ({', '.join(EDIT_KINDS)})")
    header = {"kind": edit.kind, "strength": edit.strength, "meta": edit.meta}
    data = safetensors_bytes(edit.to_tensors(), metadata={"memprobe_edit": json.dumps(header, sort_keys=True)})
    return atomic_write(path, data)


def load_edit(path: str | Path) -> Edit:
    """Read an edit written by `save_edit` (safetensors only: no pickle), by its registered kind."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise MemprobeError(f"no edit file at {path}: make one with experiments/suppress.py or save_edit")
    try:
        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {}).get("memprobe_edit", "{}"))
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise MemprobeError(f"{path} is not a readable safetensors edit file ({err}): save it with save_edit") from err
    if "kind" not in header:
        raise MemprobeError(f"{path} is not a memprobe edit file (no 'memprobe_edit' header)")
    kind = header["kind"]
    if kind not in EDIT_KINDS:
        raise MemprobeError(f"{path}: unknown edit kind {kind!r}; known kinds: {', '.join(sorted(EDIT_KINDS))}")
    return EDIT_KINDS[kind].from_tensors(tensors, header.get("strength", 1.0), header.get("meta", {}))


@contextmanager
def hooked_edit(model: nn.Module, edit: Edit) -> Iterator[nn.Module]:
    """Apply `edit` to a plain HF model with forward hooks for the duration of the block."""
    adapter = adapter_for(model)
    handles = []
    try:
        if isinstance(edit, NeuronEdit):
            for layer in edit.neurons:
                down = model.get_submodule(adapter.at(layer, adapter.mlp_out))

                def pre(_m, args, layer=layer):
                    return (edit.apply(layer, args[0]), *args[1:])

                handles.append(down.register_forward_pre_hook(pre))
        elif isinstance(edit, LowRankEdit):
            for layer in edit.factors:
                down = model.get_submodule(adapter.at(layer, adapter.mlp_out))
                handles.append(down.register_forward_hook(
                    lambda _m, args, out, layer=layer: out + edit.delta(layer, args[0])))
        else:
            for path in adapter.residual_writers():
                def post(_m, _args, out):
                    if isinstance(out, tuple):
                        return (edit.apply(out[0]), *out[1:])
                    return edit.apply(out)

                handles.append(model.get_submodule(path).register_forward_hook(post))
        yield model
    finally:
        for h in handles:
            h.remove()


def lens_hooks(edit: Edit, n_layers: int | Adapter) -> list[tuple[str, Callable]]:
    """TransformerLens `fwd_hooks` applying `edit`: use as `bridge.hooks(fwd_hooks=lens_hooks(...))`.

    Pass the model's adapter (or, for a Llama-style model, its layer count) so that a direction edit
    also reaches the family's other residual writes (GPT-2's position embedding)."""
    if isinstance(edit, NeuronEdit):
        return [(f"blocks.{layer}.mlp.hook_post", lambda act, hook, layer=layer: edit.apply(layer, act))
                for layer in sorted(edit.neurons)]
    if isinstance(edit, LowRankEdit):  # neurons read at hook_post, delta added to the MLP output (pre post-norm)
        hidden: dict[int, torch.Tensor] = {}

        def keep(act, hook, layer):
            hidden[layer] = act

        def add(out, hook, layer):
            return out + edit.delta(layer, hidden.pop(layer))

        hooks = []
        for layer in sorted(edit.factors):
            hooks += [(f"blocks.{layer}.mlp.hook_post", lambda act, hook, layer=layer: keep(act, hook, layer)),
                      (f"blocks.{layer}.mlp.hook_out", lambda out, hook, layer=layer: add(out, hook, layer))]
        return hooks

    def project(act, hook):
        return edit.apply(act)

    if isinstance(n_layers, Adapter):
        names = n_layers.lens_residual_writes()
    else:
        names = ["hook_embed"] + [f"blocks.{i}.hook_{k}_out" for i in range(n_layers) for k in ("attn", "mlp")]
    return [(n, project) for n in names]


def _envoy(wrapped: Any, path: str) -> Any:
    env = wrapped
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def apply_in_trace(wrapped: Any, edit: Edit) -> None:
    """Apply `edit` inside an open nnsight trace on `wrapped` (a `TransformersModel`), in execution order.

    Call it first in the trace, then read outputs: `with m.trace(ids): apply_in_trace(m, e); y = m.output.save()`.
    """
    adapter = adapter_for(wrapped._module)
    if isinstance(edit, NeuronEdit):
        for layer in sorted(edit.neurons):
            env = _envoy(wrapped, adapter.at(layer, adapter.mlp_out))
            env.input = edit.apply(layer, env.input)
        return
    if isinstance(edit, LowRankEdit):
        for layer in sorted(edit.factors):
            env = _envoy(wrapped, adapter.at(layer, adapter.mlp_out))
            hidden = env.input
            env.output = env.output + edit.delta(layer, hidden)
        return
    for path in adapter.residual_writers():
        env = _envoy(wrapped, path)
        out = env.output
        env.output = (edit.apply(out[0]), *out[1:]) if isinstance(out, tuple) else edit.apply(out)
