"""A causal LM fine-tuned with LoRA as a sequence classifier that reads the last real token.

Why this shape: Dentan et al. fine-tune an LLM as a classifier. On a CPU the frozen lower blocks cost
most and never change, so their output is computed once (`frozen_prefix`) and only the top
`train_layers` blocks (peft LoRA adapters) and a linear head train on it. The head reads the final-norm
state of the last real token, like HF's `*ForSequenceClassification` (right padding + causal attention:
pads never reach that token). Samples are addressed by their index: the classifier holds the prefix, so
`train_classifier` (resumable checkpoints), `predict_logits`, `capture_outputs` and `train_shadows` work on
it unchanged. Its state dict holds only what training changes (LoRA and head), so checkpoints are small.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from memprobe.adapters.registry import adapter_for
from memprobe.backends.torch_hooks import run_with_hooks
from memprobe.capture import pad_batch, pad_id
from memprobe.errors import MemprobeError
from memprobe.hookpoint import HookPoint
from memprobe.io.atomic import atomic_write
from memprobe.models import LoadedModel
from memprobe.predict.shadow import TrainFn
from memprobe.train.classifier import TrainConfig, predict_logits, train_classifier


@dataclass(frozen=True)
class LoRASpec:
    """Which top blocks train (LoRA on `targets` in each) and the adapters' rank, scale and dropout."""

    train_layers: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # leaf module names; () = every nn.Linear of the trained blocks


@dataclass
class FrozenPrefix:
    """What the frozen blocks 0..cut-1 make of every sample, computed once.

    `hidden` (n, T, d) is the input of block `cut` (right-padded), `lengths` (n,) the real token counts,
    `last_token` {"layer{i}": (n, d)} the last real token's residual after each frozen block i: the
    pretrained, training-independent representations (an a-priori reference for PSMI).
    """

    hidden: torch.Tensor
    lengths: torch.Tensor
    cut: int
    last_token: dict[str, torch.Tensor]


def _blocks(model: nn.Module) -> tuple[Any, str]:
    """The family adapter and the path of the rotary embedding the blocks need (Llama-style families)."""
    adapter = adapter_for(model)
    rotary = adapter.layers.removesuffix("layers") + "rotary_emb"
    try:
        model.get_submodule(rotary)
    except AttributeError:
        raise MemprobeError(f"{type(model).__name__} has no {rotary}: the LoRA classifier runs Llama-style "
                            "blocks (llama, mistral, qwen2, SmolLM2); use one of those") from None
    return adapter, rotary


def encode_texts(loaded: LoadedModel, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text with the model's one tokenisation, keeping the first `max_tokens`."""
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise MemprobeError(f"text {i} is empty: remove it or give it text")
        out.append(loaded.encode(text)[:max_tokens])
    return out


def _prefix_key(loaded: LoadedModel, seqs: list[list[int]], cut: int) -> str:
    """Content key of a prefix: the model (name, weights hash), the cut and the exact token ids."""
    what = [loaded.info.get("name"), loaded.info.get("sha256"), loaded.info.get("seed"), cut, seqs]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


@torch.no_grad()
def frozen_prefix(loaded: LoadedModel, texts: Sequence[str], cut: int, *, max_tokens: int = 32,
                  batch_size: int = 32, cache_path: str | Path | None = None) -> FrozenPrefix:
    """Run blocks 0..cut-1 once over all texts (memprobe's hooks; the forward stops after block cut-1).

    With `cache_path` the prefix is saved there (safetensors, written atomically) and reused by a later
    call only if its content key (model, cut, token ids) matches; otherwise it is recomputed.
    """
    from safetensors.torch import load_file, save

    model = loaded.model.eval()
    adapter, _ = _blocks(model)
    if not 1 <= cut < adapter.n_layers:
        raise MemprobeError(f"cut must be in 1..{adapter.n_layers - 1} (at least one frozen and one trained "
                            f"block), not {cut}")
    seqs = encode_texts(loaded, texts, max_tokens)
    key = _prefix_key(loaded, seqs, cut)
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and path.exists():
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            same = (f.metadata() or {}).get("key") == key
        if same:
            data = load_file(path)
            last = {k.removeprefix("last."): v for k, v in data.items() if k.startswith("last.")}
            return FrozenPrefix(data["hidden"], data["lengths"], cut, last)
    prefix = _run_prefix(model, adapter, seqs, pad_id(loaded), cut, batch_size)
    if path is not None:
        tensors = {"hidden": prefix.hidden, "lengths": prefix.lengths,
                   **{f"last.{k}": v for k, v in prefix.last_token.items()}}
        atomic_write(path, save(tensors, metadata={"key": key}))
    return prefix


def _run_prefix(model: nn.Module, adapter: Any, seqs: list[list[int]], pad: int, cut: int,
                batch_size: int) -> FrozenPrefix:
    ids, mask = pad_batch(seqs, pad)
    points = {f"layer{i}": HookPoint(adapter.block(i)) for i in range(cut)}
    hidden, last = [], {k: [] for k in points}
    for i in range(0, len(seqs), batch_size):
        b_ids, b_mask = ids[i:i + batch_size], mask[i:i + batch_size]
        out = run_with_hooks(model, points, input_ids=b_ids, attention_mask=b_mask, use_cache=False)
        rows, pos = torch.arange(len(b_ids)), b_mask.sum(1) - 1
        for k in points:
            last[k].append(out[k][rows, pos])
        hidden.append(out[f"layer{cut - 1}"])
    return FrozenPrefix(torch.cat(hidden).contiguous(), mask.sum(1), cut,
                        {k: torch.cat(v).contiguous() for k, v in last.items()})


class LoRALastTokenClassifier(nn.Module):
    """Top blocks of `model` with LoRA, its final norm and a linear head, fed the frozen prefix.

    `forward(index)` takes sample indices into the prefix, (n,) or (n, 1). Identity `taps.block{i}` / `taps.norm` see the
    last real token's residual after each trained block and after the final norm (the head's input), so
    memprobe's module capture reads exactly those (batch, d) representations.
    """

    def __init__(self, model: nn.Module, prefix: FrozenPrefix, n_classes: int, spec: LoRASpec = LoRASpec()):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        adapter, rotary = _blocks(model)
        cut = adapter.n_layers - spec.train_layers
        if prefix.cut != cut:
            raise MemprobeError(f"the prefix stops at block {prefix.cut} but training {spec.train_layers} of "
                                f"{adapter.n_layers} blocks needs it at {cut}: recompute frozen_prefix(cut={cut})")
        if n_classes < 2:
            raise MemprobeError(f"a classifier needs at least 2 classes, not {n_classes}")
        self.names = [f"block{i}" for i in range(cut, adapter.n_layers)]
        self.blocks = nn.ModuleList(copy.deepcopy(model.get_submodule(adapter.block(i)))
                                    for i in range(cut, adapter.n_layers))
        self.norm = copy.deepcopy(model.get_submodule(adapter.final_norm))
        self.rotary = copy.deepcopy(model.get_submodule(rotary))
        for p in self.parameters():
            p.requires_grad_(False)
        present = {name.rsplit(".", 1)[-1] for name, _ in self.blocks.named_modules()}
        # Default: every linear layer of the trained blocks, found by type, so no family's module
        # names are spelled here (adapters are the only code that knows them).
        targets = spec.targets or tuple(sorted({name.rsplit(".", 1)[-1] for name, m in self.blocks.named_modules()
                                                if isinstance(m, nn.Linear)}))
        if not set(targets) & present:
            raise MemprobeError(f"no LoRA target among {targets} in the trained blocks: name their "
                                f"linear layers in LoRASpec.targets (they have {sorted(present - {''})[:8]})")
        inject_adapter_in_model(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                           target_modules=list(targets)), self.blocks)
        self.taps = nn.ModuleDict({name: nn.Identity() for name in [*self.names, "norm"]})
        self.head = nn.Linear(prefix.hidden.shape[-1], n_classes)
        self.register_buffer("prefix_hidden", prefix.hidden, persistent=False)
        self.register_buffer("lengths", prefix.lengths, persistent=False)
        self.trained = {name for name, p in self.named_parameters() if p.requires_grad}

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long, device=self.prefix_hidden.device)
        if index.ndim == 2 and index.shape[1] == 1:  # (n, 1): rows, the shape memprobe's capture batches
            index = index[:, 0]
        if index.ndim != 1:
            raise MemprobeError(f"inputs are sample indices, shape (n,) or (n, 1), not {tuple(index.shape)}")
        if index.numel() == 0 or index.min() < 0 or index.max() >= len(self.lengths):
            raise MemprobeError(f"inputs are sample indices into the prefix's {len(self.lengths)} texts; got "
                                f"{index.numel()} indices outside 0..{len(self.lengths) - 1} or none")
        last = self.lengths[index] - 1
        width = int(last.max()) + 1
        h = self.prefix_hidden[index, :width]
        rows = torch.arange(len(index), device=h.device)
        pos = torch.arange(width, device=h.device).expand(len(index), width)
        rope = self.rotary(h, pos)
        causal = torch.full((width, width), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)
        for name, block in zip(self.names, self.blocks, strict=True):
            h = block(h, attention_mask=causal[None, None], position_ids=pos, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
            self.taps[name](h[rows, last])
        return self.head(self.taps["norm"](self.norm(h[rows, last])))

    def state_dict(self, *args: Any, **kwargs: Any) -> OrderedDict[str, torch.Tensor]:
        """Only the trained tensors (LoRA and head): the rest is the pretrained model, unchanged."""
        full = super().state_dict(*args, **kwargs)
        return OrderedDict((k, v) for k, v in full.items() if k in self.trained)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if strict and set(state) != self.trained:
            raise MemprobeError(f"state does not match this classifier's trained tensors (missing "
                                f"{sorted(self.trained - set(state))[:3]}, unexpected "
                                f"{sorted(set(state) - self.trained)[:3]}): same LoRASpec and classes?")
        try:
            return super().load_state_dict(state, strict=False, assign=assign)
        except RuntimeError as exc:
            raise MemprobeError(f"state has other shapes than this classifier (classes, rank?): {exc}") from None


def shadow_train_fn(make_model: Callable[[], nn.Module], labels: np.ndarray, config: TrainConfig) -> TrainFn:
    """`train_fn(train_indices, seed) -> logits of all samples` (shadow.train_shadows' contract).

    Each call seeds torch, builds a fresh model and trains it on the given indices (no snapshots in
    between), then scores every sample: for index-addressed models such as LoRALastTokenClassifier.
    """
    y = torch.as_tensor(np.asarray(labels)).long()
    everyone = torch.arange(len(y))

    def train_fn(train_indices: np.ndarray, seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        model = make_model()
        idx = torch.as_tensor(np.asarray(train_indices)).long()
        train_classifier(model, everyone[idx], y[idx], replace(config, seed=seed, eval_every=10**9))
        return predict_logits(model, everyone).numpy()

    return train_fn
