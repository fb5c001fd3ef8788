"""A small Llama trained from scratch, and injection of new sequences into known MLP neurons (INJ).

Why: localization methods can only be scored against ground truth when we know which neurons hold a
sequence. Chang et al.'s INJ benchmark fine-tunes a model on new sequences while updating only a
random subset of MLP neurons (their rows in the MLP in-projections and column in the out-projection), one
subset per sequence; a method then earns Recall@k% = the share of that subset in its top k% neurons.
The base model is a small HF Llama with memprobe's byte tokenizer, trained on the bundled texts so it
is a real (if weak) language model; checkpoints are standard safetensors HF directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from memprobe.adapters import adapter_for
from memprobe.errors import MemprobeError
from memprobe.io import staged_directory
from memprobe.models import LoadedModel, load_model, tiny_model


def _batches(ids: Sequence[Sequence[int]], seq_len: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    stream = torch.tensor([t for doc in ids for t in doc], dtype=torch.long)
    starts = torch.randint(0, max(1, len(stream) - seq_len - 1), (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts])


def train_tiny_lm(texts: Sequence[str], *, n_layers: int = 2, d_model: int = 64, steps: int = 200,
                  seq_len: int = 96, batch: int = 16, lr: float = 3e-3, seed: int = 0,
                  checkpoint: str | Path | None = None) -> LoadedModel:
    """Train a byte-level Llama on `texts` (or load `checkpoint` when it holds a finished run)."""
    if checkpoint is not None and (Path(checkpoint) / "config.json").exists():
        return load_model(str(checkpoint))
    loaded = tiny_model("llama", seed=seed, n_layers=n_layers, d_model=d_model)
    model = loaded.model.train()
    ids = [loaded.encode(t) for t in texts]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        x = _batches(ids, seq_len, batch, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    loaded.info["train"] = {"steps": steps, "seq_len": seq_len, "batch": batch, "lr": lr, "seed": seed,
                            "final_loss": float(loss.detach()), "texts": len(texts)}
    if checkpoint is not None:  # published whole: a directory with config.json is a finished run
        with staged_directory(checkpoint, replace=True) as staged:
            model.save_pretrained(staged, safe_serialization=True)
            loaded.tokenizer.save_pretrained(staged)
    return loaded


def inject(loaded: LoadedModel, sequences: Sequence[Sequence[int]], neurons: Sequence[torch.Tensor], *,
           steps: int = 100, lr: float = 1e-2) -> list[float]:
    """Fine-tune `loaded.model` in place so it memorizes each sequence using only its own neurons.

    `neurons[j]` holds flat neuron indices (layer * d_mlp + unit) for sequence j. Every step sums,
    over the sequences, each one's gradient masked to its own neurons (their features in the MLP in- and
    out-projections, as the family adapter names them), so a sequence's loss only moves its neurons while all of them train together (one
    after another, later injections overwrite earlier ones); all other weights stay exactly as they
    were. Returns the final per-sequence losses.
    """
    model = loaded.model
    adapter = adapter_for(model)
    if not adapter.neuron_in:
        raise MemprobeError(f"{adapter.family} fuses its MLP in-projections: neuron injection is not supported")
    width = adapter.mlp_width(model)
    # per layer: (weight, the axis that indexes neurons); Conv1D weights are (in, out)
    layers = [[(model.get_submodule(adapter.at(i, rel)).weight, 1 if adapter.conv1d else 0) for rel in adapter.neuron_in]
              + [(model.get_submodule(adapter.at(i, adapter.mlp_out)).weight, 0 if adapter.conv1d else 1)]
              for i in range(adapter.n_layers)]
    params = [p for layer in layers for p, _ in layer]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    masks = []
    for flat in neurons:
        per_layer = [torch.zeros(width, dtype=torch.bool) for _ in layers]
        for n in flat.tolist():
            per_layer[n // width][n % width] = True
        masks.append(per_layer)
    model.train()
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):  # every sequence in every step: each one's gradient masked to its own neurons
        total = [torch.zeros_like(p) for p in params]
        for seq, keep_layers in zip(sequences, masks, strict=True):
            x = torch.tensor([list(seq)])
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            for layer, keep in zip(layers, keep_layers, strict=True):
                for p, axis in layer:
                    p.grad.index_fill_(axis, (~keep).nonzero().flatten(), 0.0)
            for acc, p in zip(total, params, strict=True):
                acc += p.grad
        for acc, p in zip(total, params, strict=True):
            p.grad = acc
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([list(s)]), labels=torch.tensor([list(s)])).loss) for s in sequences]
