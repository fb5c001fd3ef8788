"""Small encoders for 28x28 grayscale images, trained with SimCLR (NT-Xent) or supervised, on CPU.

What it is for: SSLMem / LayerMem / UnitMem need a *pair* of encoders trained identically (same
seed, same hyperparameters) on shared + candidate points (f) and shared + independent points (g),
plus supervised encoders of the same architecture for comparison. Everything here is seeded,
checkpointed with safetensors after every epoch, and resumes where it stopped.

Architectures (every activation is its own module, so hooks read post-ReLU/GELU values):
- `SmallResNet`: normalize -> stem (conv-BN-ReLU) -> layer1..layer4 (one BasicBlock each; the
  block's output is ReLU(residual branch + skip), so capturing `layerK` keeps the residual addition)
  -> pool (global average, the representation) -> head (SimCLR projection MLP, or a linear classifier).
- `TinyViT`: patch embedding -> pre-LN transformer blocks, each marking the residual stream after
  its attention half (`blocks.i.attn_out`) and after its MLP half (`blocks.i.mlp_out`), with MLP
  neurons at `blocks.i.mlp.act` (GELU) -> mean-pooled tokens -> head.

Checkpoint format (`<dir>/<name>.safetensors`): model tensors under "model.", Adam state under
"opt.<param index>.<key>", and metadata {"epoch", "config" (JSON), "history" (JSON)}.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from memprobe.errors import MemprobeError
from memprobe.io import atomic_path
from memprobe.train.augment import AugmentConfig, augment

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class Normalize(nn.Module):
    """(x - mean) / std with fixed constants; the model's first module, so augmentations come first."""

    def __init__(self, mean: float = FASHION_MEAN, std: float = FASHION_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """conv-BN-ReLU (`act1`) -> conv-BN, + skip (identity or 1x1 conv-BN), -> ReLU (`act2` = output)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(h)) + self.shortcut(x))


class Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x


class SmallResNet(nn.Module):
    """A 9-conv ResNet for 1x28x28 inputs in [0, 1]; `encode` gives the pooled representation."""

    def __init__(self, widths: tuple[int, ...] = (16, 16, 32, 64, 128), *, head: str = "projection",
                 proj_dim: int = 64, n_classes: int = 10, in_channels: int = 1,
                 mean: float = FASHION_MEAN, std: float = FASHION_STD):
        super().__init__()
        if len(widths) != 5:
            raise MemprobeError("widths must give 5 channel counts: stem, layer1..layer4")
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), bn=nn.BatchNorm2d(widths[0]), act=nn.ReLU()))
        strides = (1, 2, 2, 2)
        for i in range(4):
            setattr(self, f"layer{i + 1}", BasicBlock(widths[i], widths[i + 1], strides[i]))
        self.pool = Pool()
        d = widths[-1]
        self.head = (nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, proj_dim)) if head == "projection"
                     else nn.Linear(d, n_classes))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.normalize(x))
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
        return self.pool(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    @staticmethod
    def layer_sites() -> list[str]:
        """Representation sites in input-to-output order (block outputs keep the residual)."""
        sites = ["stem"]
        for i in range(1, 5):
            sites += [f"layer{i}.act1", f"layer{i}"]
        return sites + ["pool"]

    @staticmethod
    def unit_sites() -> list[str]:
        """Post-ReLU sites whose channels are UnitMem units (pool = layer4's channels, so left out)."""
        return SmallResNet.layer_sites()[:-1]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; `attn_out` / `mlp_out` mark the residual stream after each half."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.attn_out = nn.Identity()
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)
        self.mlp_out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_out(x + self.attn(self.ln1(x)))
        return self.mlp_out(x + self.mlp(self.ln2(x)))


class TinyViT(nn.Module):
    """A 4-block ViT for 1x28x28 inputs (7x7 patches of 4x4 pixels), mean-pooled tokens."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2, patch: int = 4, *,
                 head: str = "projection", proj_dim: int = 64, n_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, mean: float = FASHION_MEAN, std: float = FASHION_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        n_tok = (image_size // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, n_tok, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = Pool1d()
        self.head = (nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim)) if head == "projection"
                     else nn.Linear(dim, n_classes))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(self.normalize(x)).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.pool(self.norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

    def layer_sites(self) -> list[str]:
        sites = []
        for i in range(len(self.blocks)):
            sites += [f"blocks.{i}.attn_out", f"blocks.{i}.mlp_out"]
        return sites + ["pool"]

    def unit_sites(self) -> list[str]:
        return [f"blocks.{i}.mlp.act" for i in range(len(self.blocks))]


class Pool1d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy over 2N views (each view's positive is its pair)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


@dataclass
class TrainConfig:
    """Hyperparameters; f and g of a pair must share all of them (only the data differ)."""

    mode: str = "simclr"  # "simclr" | "supervised"
    arch: str = "resnet"  # "resnet" | "vit"
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    temperature: float = 0.5
    warmup_epochs: int = 2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    threads: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def build_model(cfg: TrainConfig, n_classes: int = 10) -> nn.Module:
    head = "projection" if cfg.mode == "simclr" else "classifier"
    torch.manual_seed(cfg.seed)  # identical initial weights for f and g
    if cfg.arch == "resnet":
        return SmallResNet(head=head, n_classes=n_classes)
    if cfg.arch == "vit":
        return TinyViT(head=head, n_classes=n_classes)
    raise MemprobeError(f"unknown arch {cfg.arch!r}: use 'resnet' or 'vit'")


def _lr_at(cfg: TrainConfig, epoch: float) -> float:
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1e-3) / cfg.warmup_epochs
    p = (epoch - cfg.warmup_epochs) / max(1e-9, cfg.epochs - cfg.warmup_epochs)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, epoch: int,
                    cfg: TrainConfig, history: list[dict]) -> None:
    """Model + Adam state in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    groups = []
    if opt is not None:
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).contiguous().clone()
        groups = sd["param_groups"]
    meta = {"epoch": str(epoch), "config": cfg.to_json(), "history": json.dumps(history),
            "param_groups": json.dumps(groups)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise MemprobeError(f"no checkpoint at {path}: train it first (experiments/localize_ssl.py)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def load_encoder(path: str | Path, n_classes: int = 10) -> tuple[nn.Module, TrainConfig, dict]:
    """Rebuild a model from its checkpoint: (model in eval mode, config, metadata incl. history)."""
    tensors, meta = read_checkpoint(path)
    raw = json.loads(meta["config"])
    raw["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["augment"].items()})
    cfg = TrainConfig(**raw)
    model = build_model(cfg, n_classes)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    info = {"epoch": int(meta["epoch"]), "history": json.loads(meta.get("history", "[]"))}
    return model.eval(), cfg, info


def train_encoder(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: TrainConfig,
    ckpt: str | Path | None = None,
    *,
    n_classes: int = 10,
    log: Callable[[str], None] | None = print,
) -> tuple[nn.Module, list[dict]]:
    """Train (or resume) an encoder on `images` (N, 1, H, W) in [0, 1]; returns (model, history).

    SimCLR: two augmented views per image, NT-Xent on the projection head. Supervised: one
    augmented view, cross entropy on a linear head over the same encoder. The data order and the
    augmentations of epoch e come from a generator seeded with (seed, e), so a resumed run is the
    same as an uninterrupted one, and f and g see the shared points in comparable order.
    """
    if cfg.mode not in ("simclr", "supervised"):
        raise MemprobeError(f"mode must be 'simclr' or 'supervised', not {cfg.mode!r}")
    if cfg.mode == "supervised" and labels is None:
        raise MemprobeError("supervised training needs labels")
    if images.ndim != 4:
        raise MemprobeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg, n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start = 0
    ckpt = Path(ckpt) if ckpt is not None else None
    if ckpt is not None and ckpt.exists():
        tensors, meta = read_checkpoint(ckpt)
        if json.loads(meta["config"]) != json.loads(cfg.to_json()):
            raise MemprobeError(f"{ckpt} was trained with a different config: delete it or use another path")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, key = k.split(".", 2)
                state.setdefault(int(pid), {})[key] = v
        if state:
            opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        start = int(meta["epoch"])
        history = json.loads(meta.get("history", "[]"))
        if log and start:
            log(f"resumed {ckpt.name} at epoch {start}/{cfg.epochs}")
    n = images.shape[0]
    bs = min(cfg.batch_size, n)
    steps = max(1, n // bs)  # drop the last partial batch (NT-Xent and BN like full batches)
    for epoch in range(start, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        t0, total = time.time(), 0.0
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, epoch + s / steps)
            idx = perm[s * bs : (s + 1) * bs]
            x = images[idx]
            if cfg.mode == "simclr":
                v1, v2 = augment(x, gen, cfg.augment), augment(x, gen, cfg.augment)
                out = model(torch.cat([v1, v2]))
                loss = nt_xent(out[: len(idx)], out[len(idx) :], cfg.temperature)
            else:
                loss = F.cross_entropy(model(augment(x, gen, cfg.augment)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append({"epoch": epoch + 1, "loss": total / steps, "seconds": round(time.time() - t0, 2)})
        if ckpt is not None:
            save_checkpoint(ckpt, model, opt, epoch + 1, cfg, history)
        if log:
            log(f"{cfg.mode}/{cfg.arch} epoch {epoch + 1}/{cfg.epochs} loss {total / steps:.4f} "
                f"({time.time() - t0:.1f}s)")
    return model.eval(), history


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def knn_accuracy(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, k: int = 20) -> float:
    """Cosine k-NN accuracy of the representation (a standard SSL encoder quality check)."""
    a = F.normalize(embed(model, train_x), dim=1)
    b = F.normalize(embed(model, test_x), dim=1)
    sims = b @ a.t()
    top = sims.topk(k, dim=1).indices
    votes = train_y[top]
    pred = torch.mode(votes, dim=1).values
    return float((pred == test_y).float().mean())


def memorization_split(n_total: int, shared: int, candidates: int, independent: int, seed: int = 0
                       ) -> dict[str, torch.Tensor]:
    """Disjoint random index sets for SSLMem: f trains on shared + candidates, g on shared + independent."""
    need = shared + candidates + independent
    if need > n_total:
        raise MemprobeError(f"the split needs {need} points but the dataset has {n_total}")
    if min(shared, candidates, independent) < 1:
        raise MemprobeError("shared, candidate and independent sets must each have at least one point")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return {
        "shared": perm[:shared].sort().values,
        "candidates": perm[shared : shared + candidates].sort().values,
        "independent": perm[shared + candidates : need].sort().values,
    }
