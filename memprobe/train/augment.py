"""Batched, seeded SimCLR-style augmentations for small grayscale images (tensors in [0, 1]).

Why batched: SSLMem and UnitMem need ~10 views of thousands of points; per-image PIL transforms
would cost more than the forward passes. All randomness comes from the `torch.Generator` passed
in, so the same seed gives the same views (f and g must see identical augmentations).

Augmentations act on the raw [0, 1] image; input normalisation is the model's first module
(`memprobe.train.simclr.SmallResNet.normalize`), so it always comes after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Random resized crop (area `scale`, aspect `ratio`), horizontal flip, brightness/contrast."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def augment(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """One random view of each image in `x` (N, C, H, W), values in [0, 1]."""
    n = x.shape[0]
    area = _uniform(n, *cfg.scale, gen)
    log_r = _uniform(n, float(torch.log(torch.tensor(cfg.ratio[0]))), float(torch.log(torch.tensor(cfg.ratio[1]))), gen)
    r = torch.exp(log_r)
    sx = torch.sqrt(area * r).clamp(max=1.0)  # crop width as a fraction of the image
    sy = torch.sqrt(area / r).clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen) < cfg.flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="zeros", align_corners=False)
    apply = (torch.rand(n, generator=gen) < cfg.jitter_p).to(x.dtype).view(n, 1, 1, 1)
    b = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, gen).view(n, 1, 1, 1)
    c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, gen).view(n, 1, 1, 1)
    b = (1 + apply * (b - 1)).to(x.device)
    c = (1 + apply * (c - 1)).to(x.device)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * c + mean) * b
    return out.clamp_(0.0, 1.0)


def make_augment(cfg: AugmentConfig = AugmentConfig()):
    """`augment` bound to `cfg`, with the (x, generator) signature the localize functions take."""
    return lambda x, gen: augment(x, gen, cfg)
