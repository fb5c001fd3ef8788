"""Image datasets that are on this machine without a network: Fashion-MNIST (Debian), sklearn digits.

Why a fallback: the Debian package `dataset-fashion-mnist` may be absent on a user's machine; sklearn's
8x8 digits always ship with scikit-learn, so experiments still run (and say which data they used).
"""

from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memprobe.errors import MemprobeError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class ImageDataset:
    """Images as float tensors in [0, 1], shape (N, 1, H, W), with integer labels and a name."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    classes: tuple[str, ...]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise MemprobeError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def fashion_mnist(split: str = "train", root: Path = FASHION_DIR) -> ImageDataset:
    """Fashion-MNIST from the Debian package files; fails with the install command if absent."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise MemprobeError(f"split must be 'train' or 'test', not {split!r}")
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise MemprobeError(
            f"Fashion-MNIST not found under {root}: install it with "
            "`apt-get install dataset-fashion-mnist` (or use dataset='digits')"
        )
    images = torch.from_numpy(_read_idx(img).copy()).float().div_(255).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
    return ImageDataset(images, labels, "fashion-mnist", FASHION_CLASSES)


def digits() -> ImageDataset:
    """sklearn's 8x8 handwritten digits (1,797 images), upsampled to 16x16 for small conv nets."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images).float().div_(16).unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=16, mode="bilinear", align_corners=False)
    return ImageDataset(images, torch.from_numpy(d.target).long(), "sklearn-digits", tuple(map(str, range(10))))


def load_images(name: str = "fashion-mnist", split: str = "train") -> ImageDataset:
    """Load `name` ('fashion-mnist' or 'digits'); falls back to digits, loudly, if Fashion-MNIST is absent."""
    if name == "digits":
        return digits()
    if name != "fashion-mnist":
        raise MemprobeError(f"unknown image dataset {name!r}: use 'fashion-mnist' or 'digits'")
    try:
        return fashion_mnist(split)
    except MemprobeError as exc:
        warnings.warn(f"{exc}; falling back to sklearn digits", stacklevel=2)
        return digits()
