"""Small classifiers (MLP heads, a small CNN) trained with per-sample loss tracking and resumable checkpoints.

Why per-sample losses at each checkpoint: memorization predictors look at the model early in training
(Dentan et al. pick the first point where the median training loss is <= 5% of its initial value), and the
early loss itself is a baseline predictor. Checkpoints are safetensors (weights + tracked losses) plus an
optimiser/RNG file read with torch.load(weights_only=True), so an interrupted run resumes exactly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memprobe.errors import MemprobeError
from memprobe.io import atomic_path, atomic_write


def mlp(in_dim: int, hidden: Sequence[int], n_classes: int) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear. Hidden activations are modules `act{i}`."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    prev = in_dim
    for i, width in enumerate(hidden):
        layers[f"fc{i}"] = nn.Linear(prev, width)
        layers[f"act{i}"] = nn.ReLU()
        prev = width
    layers["out"] = nn.Linear(prev, n_classes)
    return nn.Sequential(layers)


def small_cnn(in_channels: int, n_classes: int, width: int = 32) -> nn.Sequential:
    """Two conv blocks, global average pool, a hidden dense layer `act2` and the output layer."""
    return nn.Sequential(OrderedDict(
        conv0=nn.Conv2d(in_channels, width, 3, padding=1), act0=nn.ReLU(), pool0=nn.MaxPool2d(2),
        conv1=nn.Conv2d(width, 2 * width, 3, padding=1), act1=nn.ReLU(),
        gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        fc2=nn.Linear(2 * width, 2 * width), act2=nn.ReLU(), out=nn.Linear(2 * width, n_classes),
    ))


@dataclass
class TrainConfig:
    """Optimisation settings; `eval_every` counts optimiser steps between loss snapshots/checkpoints."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 10
    seed: int = 0


@dataclass
class TrainHistory:
    """Per-sample training losses and logits at each snapshot (step 0 = before any update)."""

    steps: list[int] = field(default_factory=list)
    losses: list[np.ndarray] = field(default_factory=list)  # each (n,)
    logits: list[np.ndarray] = field(default_factory=list)  # each (n, classes)
    weights: list[dict[str, torch.Tensor]] = field(default_factory=list)  # when keep_weights=True

    def median_loss(self) -> np.ndarray:
        return np.array([np.median(loss) for loss in self.losses])

    def early_index(self, fraction: float = 0.05) -> int:
        """First snapshot whose median training loss is <= `fraction` x the initial median (last if never)."""
        med = self.median_loss()
        hit = np.flatnonzero(med <= fraction * med[0])
        return int(hit[0]) if hit.size else len(med) - 1


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits for every row of `x`, in eval mode, batched."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _snapshot(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    logits = predict_logits(model, x)
    loss = nn.functional.cross_entropy(logits, y, reduction="none")
    return loss.numpy(), logits.numpy()


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    keep_weights: bool = False,
) -> TrainHistory:
    """Train `model` on (x, y) with Adam; snapshot per-sample losses every `config.eval_every` steps.

    `keep_weights=True` also keeps a copy of the weights at every snapshot in `history.weights` (small
    models only). With `checkpoint_dir`, each snapshot writes `step{N}.safetensors` (losses, logits,
    weights) and `state.pt` (optimiser, RNG, epoch order); a later call with the same directory resumes
    from the latest snapshot instead of starting again, and gives the same result as an uninterrupted run.
    """
    if len(x) != len(y):
        raise MemprobeError(f"inputs ({len(x)}) and labels ({len(y)}) must have the same length")
    if len(x) == 0:
        raise MemprobeError("no training samples")
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = TrainHistory()
    steps_per_epoch = -(-len(x) // config.batch_size)
    total = config.epochs * steps_per_epoch
    step, perm = 0, torch.randperm(len(x), generator=gen)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        cfg_file = ckpt / "config.json"
        if cfg_file.exists() and json.loads(cfg_file.read_text()) != asdict(config):
            raise MemprobeError(f"{ckpt} holds checkpoints of a different config: use a new directory")
        atomic_write(cfg_file, json.dumps(asdict(config)))
        step, perm = _resume(ckpt, model, opt, gen, history, keep_weights, perm)
    if not history.steps:
        _record(history, model, x, y, 0, ckpt, keep_weights)
    while step < total:
        if step % steps_per_epoch == 0 and step > 0:
            perm = torch.randperm(len(x), generator=gen)
        b = step % steps_per_epoch
        batch = perm[b * config.batch_size:(b + 1) * config.batch_size]
        model.train()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % config.eval_every == 0 or step == total:
            _record(history, model, x, y, step, ckpt, keep_weights)
            if ckpt is not None:
                with atomic_path(ckpt / "state.pt") as tmp:
                    torch.save({"opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                                "perm": perm}, tmp)
    return history


def _record(history: TrainHistory, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int,
            ckpt: Path | None, keep_weights: bool) -> None:
    loss, logits = _snapshot(model, x, y)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    history.steps.append(step)
    history.losses.append(loss)
    history.logits.append(logits)
    if keep_weights:
        history.weights.append(weights)
    if ckpt is not None:
        tensors = {"loss": torch.from_numpy(loss), "logits": torch.from_numpy(logits)}
        tensors.update({f"weights.{k}": v for k, v in weights.items()})
        with atomic_path(ckpt / f"step{step}.safetensors") as tmp:
            save_file(tensors, tmp, metadata={"step": str(step)})


def _resume(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
            history: TrainHistory, keep_weights: bool, perm: torch.Tensor) -> tuple[int, torch.Tensor]:
    state_file = ckpt / "state.pt"
    if not state_file.exists():
        return 0, perm
    state = torch.load(state_file, weights_only=True)
    steps = sorted(int(p.stem[4:]) for p in ckpt.glob("step*.safetensors"))
    steps = [s for s in steps if s <= state["step"]]
    for s in steps:
        data = load_file(ckpt / f"step{s}.safetensors")
        history.steps.append(s)
        history.losses.append(data["loss"].numpy())
        history.logits.append(data["logits"].numpy())
        if keep_weights:
            history.weights.append({k[len("weights."):]: v for k, v in data.items() if k.startswith("weights.")})
    load_weights(model, ckpt / f"step{state['step']}.safetensors")
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    return int(state["step"]), state["perm"]


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights saved in a snapshot file into `model` (fails if that snapshot kept none)."""
    data = load_file(Path(path))
    weights = {k[len("weights."):]: v for k, v in data.items() if k.startswith("weights.")}
    if not weights:
        raise MemprobeError(f"{path} holds no weights: it is not a train_classifier snapshot")
    model.load_state_dict(weights)
    return model
