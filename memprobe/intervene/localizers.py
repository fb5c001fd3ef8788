"""Neuron localization methods after Chang et al. (NAACL 2024): which MLP neurons carry a sequence.

Every method scores every MLP neuron (the input of the MLP out-projection, site `blocks.{i}.mlp.hook_post`) for
one target: token ids plus the positions whose prediction is the memorized continuation. A higher
score means "dropping this neuron should hurt that continuation more". Scores come back as a
(n_layers, d_mlp) tensor, so `top_neurons` turns any of them into a `NeuronEdit`.

- `activations`: mean activation magnitude on the target minus that on background text (cheap, no gradient);
- `attribution`: activation x gradient of the target log-likelihood (attribution patching: the
  first-order estimate of zero-ablating each neuron; one backward pass);
- `integrated_gradients`: IG from the zero baseline, all layers scaled together along the path
  (a Riemann sum with `steps` points; attribution is its one-step version);
- `slimming`: a learned drop mask in [0, 1] with an L1 penalty, minimising the target likelihood;
- `hard_concrete`: the same with stochastic hard-concrete gates and an expected-L0 penalty (Louizos et al.);
- `zero_out`: drop each neuron alone and measure the loss change: exact but one forward per
  neuron, so only for small models;
- `probe_neurons`: the k neurons a sparse (top-k) logistic probe picks to tell the target's positions
  from background text (memprobe.probes.TopKProbe);
- `random_scores`: the same-size random baseline.
Slimming and Hard Concrete also add a penalty on background text so the mask does not just break the
model (Chang et al.'s mask objectives keep other data's loss in check the same way).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from memprobe.adapters import adapter_for
from memprobe.intervene.ablation import NeuronEdit

METHODS = ("activations", "attribution", "integrated_gradients", "slimming", "hard_concrete", "zero_out",
           "probe_neurons", "random")


@dataclass(frozen=True)
class Target:
    """One memorized sequence: token ids (T,) and a bool mask (T,) of the positions to be suppressed
    (position t means "token t predicted from tokens < t")."""

    token_ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def suffix(cls, ids: Sequence[int], prefix_len: int) -> Target:
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[prefix_len:] = True
        return cls(torch.as_tensor(list(ids), dtype=torch.long), mask)


def mlp_shape(model: nn.Module) -> tuple[int, int]:
    """(n_layers, d_mlp): the shape of every per-neuron score."""
    adapter = adapter_for(model)
    return adapter.n_layers, adapter.mlp_width(model)


@contextmanager
def mlp_intercept(model: nn.Module, scales: torch.Tensor | None = None, store: list | None = None) -> Iterator[None]:
    """Multiply every layer's MLP activations by `scales[layer]` (broadcast over positions) and/or
    append them (with grad) to `store`, during the block."""
    adapter = adapter_for(model)
    handles = []

    def make(layer: int):
        def pre(_m, args):
            a = args[0]
            if scales is not None:
                a = a * scales[layer]
            if store is not None:
                if a.requires_grad:
                    a.retain_grad()
                store.append(a)
            return (a, *args[1:])
        return pre

    try:
        for i in range(adapter.n_layers):
            mod = model.get_submodule(adapter.at(i, adapter.mlp_out))
            handles.append(mod.register_forward_pre_hook(make(i)))
        yield
    finally:
        for h in handles:
            h.remove()


def target_logprob(model: nn.Module, target: Target) -> torch.Tensor:
    """Sum of log p(token t | < t) over the target positions (a differentiable scalar)."""
    ids = target.token_ids[None].to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[target.positions[1:].to(logp.device)].sum()


def _acts(model: nn.Module, target: Target) -> torch.Tensor:
    store: list[torch.Tensor] = []
    with torch.no_grad(), mlp_intercept(model, store=store):
        model(input_ids=target.token_ids[None].to(next(model.parameters()).device), use_cache=False)
    return torch.stack([a[0] for a in store])  # (L, T, d_mlp)


def activations(model: nn.Module, target: Target, background: Sequence[Target] = ()) -> torch.Tensor:
    """Mean |activation| over the positions feeding the target tokens, minus the background mean."""
    feed = target.positions.roll(-1)  # position t-1 computes the prediction of token t
    feed[-1] = False
    score = _acts(model, target)[:, feed].abs().mean(1)
    if background:
        score = score - torch.stack([_acts(model, b).abs().mean(1) for b in background]).mean(0)
    return score


def _grads(model: nn.Module, target: Target, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_pos a * g, sum_pos g) for g = d(target log-lik)/d(activation), activations scaled by `alpha`."""
    n_layers, width = mlp_shape(model)
    scales = torch.full((n_layers, width), alpha, requires_grad=True)
    shift = torch.zeros((n_layers, width), requires_grad=True)
    adapter = adapter_for(model)
    handles = []
    for i in range(n_layers):
        mod = model.get_submodule(adapter.at(i, adapter.mlp_out))
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, i=i: (args[0] * scales[i] + shift[i], *args[1:])))
    try:
        target_logprob(model, target).backward()
    finally:
        for h in handles:
            h.remove()
    return scales.grad.detach(), shift.grad.detach()


def attribution(model: nn.Module, target: Target, baseline: torch.Tensor | None = None) -> torch.Tensor:
    """First-order effect on the target log-lik of replacing each neuron by `baseline` (zero when None),
    summed over positions (attribution patching): sum_pos (a - baseline) * dlogp/da."""
    act_grad, grad = _grads(model, target)
    return act_grad if baseline is None else act_grad - baseline * grad


def mean_activations(model: nn.Module, targets: Sequence[Target]) -> torch.Tensor:
    """Mean activation of every neuron over all positions of `targets` (the mean-ablation value)."""
    acts = torch.cat([_acts(model, t) for t in targets], dim=1)
    return acts.mean(1)


def integrated_gradients(model: nn.Module, target: Target, steps: int = 8) -> torch.Tensor:
    """IG from the zero-activation baseline to the real activations (midpoint Riemann sum, `steps` points)."""
    total = torch.zeros(mlp_shape(model))
    for k in range(steps):
        total += _grads(model, target, (k + 0.5) / steps)[0]
    return total / steps


def _background_logprob(model: nn.Module, background: Sequence[Target]) -> torch.Tensor:
    return sum((target_logprob(model, b) / max(int(b.positions[1:].sum()), 1) for b in background),
               torch.zeros(()))


def slimming(model: nn.Module, target: Target, background: Sequence[Target] = (), *, steps: int = 30,
             lr: float = 0.1, l1: float = 1e-3, keep_weight: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Learn drop amounts d in [0,1]: minimise target log-lik + l1 * sum(d) - keep_weight * background log-lik."""
    torch.manual_seed(seed)
    shape = mlp_shape(model)
    logit = torch.full(shape, -3.0, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=lr)
    n_tok = max(int(target.positions[1:].sum()), 1)
    for _ in range(steps):
        drop = torch.sigmoid(logit)
        with mlp_intercept(model, scales=1 - drop):
            loss = target_logprob(model, target) / n_tok - keep_weight * _background_logprob(model, background)
        loss = loss + l1 * drop.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(logit).detach()


def hard_concrete(model: nn.Module, target: Target, background: Sequence[Target] = (), *, steps: int = 30,
                  lr: float = 0.1, l0: float = 1e-3, keep_weight: float = 1.0, seed: int = 0,
                  beta: float = 2 / 3, limits: tuple[float, float] = (-0.1, 1.1)) -> torch.Tensor:
    """Hard-concrete drop gates (Louizos et al. 2018): sample, stretch, clip; penalise expected L0.

    Returns the gates' expected open probability (the ranking score)."""
    gen = torch.Generator().manual_seed(seed)
    shape = mlp_shape(model)
    log_alpha = torch.full(shape, -3.0, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=lr)
    lo, hi = limits
    n_tok = max(int(target.positions[1:].sum()), 1)
    for _ in range(steps):
        u = torch.rand(shape, generator=gen).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / beta)
        drop = (s * (hi - lo) + lo).clamp(0, 1)
        with mlp_intercept(model, scales=1 - drop):
            loss = target_logprob(model, target) / n_tok - keep_weight * _background_logprob(model, background)
        p_open = torch.sigmoid(log_alpha - beta * math.log(-lo / hi))
        loss = loss + l0 * p_open.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(log_alpha - beta * math.log(-lo / hi)).detach()


@torch.no_grad()
def zero_out(model: nn.Module, target: Target, batch: int = 64) -> torch.Tensor:
    """Exact: the drop in target log-likelihood when each neuron alone is zeroed (n_neurons forwards)."""
    n_layers, width = mlp_shape(model)
    base = float(target_logprob(model, target))
    scores = torch.zeros(n_layers, width)
    flat = n_layers * width
    for start in range(0, flat, batch):
        cols = list(range(start, min(start + batch, flat)))
        scales = torch.ones(len(cols), n_layers, 1, width)
        for row, c in enumerate(cols):
            scales[row, c // width, 0, c % width] = 0.0
        lps = _batched_logprob(model, target, scales)
        for row, c in enumerate(cols):
            scores[c // width, c % width] = base - lps[row]
    return scores


def _batched_logprob(model: nn.Module, target: Target, scales: torch.Tensor) -> torch.Tensor:
    """Target log-likelihood under each of B scale settings (B, L, 1, width), one batched forward."""
    b = scales.shape[0]
    ids = target.token_ids[None].expand(b, -1)
    with mlp_intercept(model, scales=scales.transpose(0, 1)):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return logp[:, target.positions[1:]].sum(1)


def probe_neurons(model: nn.Module, target: Target, background: Sequence[Target], k: int) -> torch.Tensor:
    """The sparse probe's neurons (memprobe.probes.TopKProbe, issue 3): fit a k-neuron logistic probe on
    all MLP activations, target positions (label 1) against background positions (label 0); the
    chosen neurons score by rank (k for the best ... 1), every other neuron 0."""
    from memprobe.probes import TopKProbe

    feed = target.positions.roll(-1)
    feed[-1] = False
    pos = _acts(model, target)[:, feed]  # (L, n, d_mlp)
    neg = torch.cat([_acts(model, b) for b in background], dim=1)
    flat = lambda a: a.permute(1, 0, 2).reshape(a.shape[1], -1).double().numpy()  # noqa: E731
    x = np.concatenate([flat(pos), flat(neg)])
    y = np.r_[np.ones(pos.shape[1]), np.zeros(neg.shape[1])]
    probe = TopKProbe(k=k).fit(x, y)
    scores = torch.zeros(mlp_shape(model))
    for rank, n in enumerate(probe.neurons_):
        scores.view(-1)[int(n)] = float(k - rank)
    return scores


def random_scores(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Uniform random scores: the baseline any method must beat."""
    return torch.rand(mlp_shape(model), generator=torch.Generator().manual_seed(seed))


def top_neurons(scores: torch.Tensor, fraction: float | None = None, *, k: int | None = None,
                strength: float = 1.0, means: torch.Tensor | None = None, meta: dict | None = None) -> NeuronEdit:
    """A NeuronEdit of the top `fraction` (or `k`) neurons by score: zero ablation, or mean ablation
    toward `means` (n_layers, d_mlp) when given."""
    flat = scores.flatten()
    k = k if k is not None else max(1, round(fraction * flat.numel()))
    idx = torch.topk(flat, k).indices
    width = scores.shape[1]
    neurons: dict[int, list[int]] = {}
    for i in sorted(idx.tolist()):
        neurons.setdefault(i // width, []).append(i % width)
    chosen = {k_: torch.tensor(v) for k_, v in neurons.items()}
    targets = None if means is None else {k_: means[k_, v] for k_, v in chosen.items()}
    return NeuronEdit(chosen, strength, targets, meta=meta or {})
