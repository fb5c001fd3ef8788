"""A small Llama trained from scratch, and injection of new sequences into known MLP neurons (INJ).

Why: localization methods can only be scored against ground truth when we know which neurons hold a
sequence. Chang et al.'s INJ benchmark fine-tunes a model on new sequences while updating only a
random subset of MLP neurons (their input rows in gate/up_proj and output column in down_proj), one
subset per sequence; a method then earns Recall@k% = the share of that subset in its top k% neurons.
The base model is a small HF Llama with memprobe's byte tokenizer, trained on the bundled texts so it
is a real (if weak) language model; checkpoints are standard safetensors HF directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from memprobe.models import LoadedModel, load_model, tiny_model
from memprobe.sites import DecoderLayout


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
    if checkpoint is not None:
        Path(checkpoint).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(checkpoint, safe_serialization=True)
        loaded.tokenizer.save_pretrained(checkpoint)
    return loaded


def inject(loaded: LoadedModel, sequences: Sequence[Sequence[int]], neurons: Sequence[torch.Tensor], *,
           steps: int = 100, lr: float = 1e-2) -> list[float]:
    """Fine-tune `loaded.model` in place so it memorizes each sequence using only its own neurons.

    `neurons[j]` holds flat neuron indices (layer * d_mlp + unit) for sequence j. Every step sums,
    over the sequences, each one's gradient masked to its own neurons (rows of gate/up_proj, columns
    of down_proj), so a sequence's loss only moves its neurons while all of them train together (one
    after another, later injections overwrite earlier ones); all other weights stay exactly as they
    were. Returns the final per-sequence losses.
    """
    model = loaded.model
    layout = DecoderLayout.of(model)
    mlps = [model.get_submodule(f"{layout.block(i)}.mlp") for i in range(layout.n_layers)]
    width = mlps[0].down_proj.in_features
    params = [p for m in mlps for p in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    masks = []
    for flat in neurons:
        per_layer = [torch.zeros(width, dtype=torch.bool) for _ in mlps]
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
            for m, keep in zip(mlps, keep_layers, strict=True):
                m.gate_proj.weight.grad[~keep] = 0
                m.up_proj.weight.grad[~keep] = 0
                m.down_proj.weight.grad[:, ~keep] = 0
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
