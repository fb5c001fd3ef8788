"""The training loop of the learned-mask localizers (Slimming, Hard Concrete), written once.

Both learn one parameter per MLP neuron by Adam: each step drops neurons by a mask computed from the
parameters (scaling them by 1 - drop), and minimises the target's log-likelihood per scored token,
minus `keep_weight` times the background's, plus a sparsity penalty. They differ only in how the
parameters become a drop mask (a sigmoid; sampled stretched-and-clipped gates) and in the penalty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memprobe.intervene.localizers.targets import (
    Target,
    background_logprob,
    mlp_intercept,
    mlp_shape,
    target_logprob,
)


def train_drop_mask(model: torch.nn.Module, target: Target, background: Sequence[Target], *, steps: int,
                    lr: float, keep_weight: float, drop: Callable[[torch.Tensor], torch.Tensor],
                    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    init: float = -3.0) -> torch.Tensor:
    """The learned parameters, (n_layers, d_mlp), starting at `init` everywhere.

    `drop(params)` is the step's drop mask in [0, 1]; `penalty(params, mask)` its sparsity cost.
    """
    params = torch.full(mlp_shape(model), init, requires_grad=True)
    opt = torch.optim.Adam([params], lr=lr)
    n_tok = max(target.n_scored, 1)
    for _ in range(steps):
        mask = drop(params)
        with mlp_intercept(model, scales=1 - mask):
            loss = (target_logprob(model, target) / n_tok
                    - keep_weight * background_logprob(model, background))
        loss = loss + penalty(params, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return params.detach()
