"""Fine-tune a causal LM on the lab's members (full or LoRA), with plain Hugging Face checkpoints and a
resume state that makes a killed run end with the same weights as an uninterrupted one.

Why these choices:
- only members: a line with `member: false` is refused, never skipped, so a mixed-up file cannot
  silently blur which documents were trained on;
- each member is repeated `copies` times per epoch (default 1) and the order of each epoch comes from
  a generator seeded with (seed, epoch), so any step's batch is known without replaying the run;
- a checkpoint is a plain HF directory (config.json, model.safetensors, tokenizer; LoRA merged, the
  adapter beside it in `adapter/`) that loads without memprobe;
- the resume state (trainable weights, optimizer, scheduler, RNG, step) is written into a fresh
  directory and published by atomically replacing `resume/latest.json`, so a kill at any moment
  leaves either the old or the new state, never half of one;
- a rerun with other arguments into the same directory is refused, naming what differs.
Provenance (`memprobe-finetune.json`) records the base model, data hash, seed, hyperparameters,
timings, versions and, per checkpoint, how often each document had been seen by then.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.resource_use import peak_rss_mb, reset_peak_rss

ARGS_FILE, PROVENANCE_FILE, RESUME_DIR = (
    "memprobe-finetune-args.json",
    "memprobe-finetune.json",
    "resume",
)
DEFAULT_STATE_EVERY = 100
GROUP_BATCHES = 16  # batches per length-sorted group (see epoch_batches)


@dataclass(frozen=True)
class FinetuneArgs:
    """Everything that decides the trained weights: a rerun must match these to resume."""

    model: str
    model_weights_sha256: str
    data_sha256: str
    epochs: int
    lr: float
    batch_size: int
    seq_len: int
    lora: bool
    lora_rank: int
    lora_alpha: float
    seed: int
    warmup_steps: int
    weight_decay: float
    save_steps: list[int] = field(default_factory=list)
    state_every: int = DEFAULT_STATE_EVERY
    steps: int | None = None  # optimizer steps when fixed (defenses match a baseline's)


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(
        json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): identifies the base weights exactly."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_train_docs(train: str | Path | Sequence[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Member documents and a description of where they came from. Accepts a lab directory (its
    members.jsonl), a JSONL file (lab format or plain {"id", "text"}), or a list of such dicts."""
    from memprobe.jsonl import read_jsonl
    from memprobe.models import file_sha256

    if isinstance(train, (str, Path)):
        path = Path(train)
        if path.is_dir():
            path = path / "members.jsonl"
        docs = read_jsonl(path)
        source = {"path": str(path), "sha256": file_sha256(path)}
    else:
        from memprobe.documents import validate_documents

        docs = [dict(d) for d in validate_documents(list(train))]
        source = {
            "path": None,
            "sha256": _sha256_json([[d["id"], d["text"], d.get("copies", 1)] for d in docs]),
        }
    nonmembers = [d["id"] for d in docs if d.get("member", True) is not True]
    if nonmembers:
        raise MemprobeError(
            f"{source['path'] or 'train documents'}: {len(nonmembers)} documents have member=false "
            f"(e.g. {nonmembers[0]!r}); finetune trains on members only: pass members.jsonl"
        )
    for d in docs:
        copies = d.get("copies", 1)
        if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
            raise MemprobeError(
                f"document {d['id']!r} has copies={copies!r}: give a whole number >= 1"
            )
    if not docs:
        raise MemprobeError("no training documents: the file is empty")
    return docs, source


def _examples(docs: list[dict], loaded: LoadedModel, seq_len: int) -> list[tuple[str, list[int]]]:
    """(doc id, token ids) per training example: each document ends with EOS, is cut into windows of
    at most seq_len tokens (nothing dropped), and appears `copies` times."""
    eos = loaded.tokenizer.eos_token_id
    out = []
    for doc in docs:
        ids = loaded.encode(doc["text"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
        windows = [w for w in windows if len(w) >= 2]  # a 1-token window has nothing to predict
        out += [(doc["id"], w) for _ in range(doc.get("copies", 1)) for w in windows]
    return out


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of one epoch: a seeded shuffle, cut into groups of
    GROUP_BATCHES batches, each group sorted by length (so a batch pads little: canaries of 27
    tokens do not pad to e-mails of 240), and the batches shuffled again. Known from (seed, epoch)
    alone, so a resumed run and a later "seen so far" count get the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    pool, batches = batch_size * GROUP_BATCHES, []
    for start in range(0, len(order), pool):
        group = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _batch(
    examples: list[tuple[str, list[int]]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    width = max(len(ids) for _, ids in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (_, seq) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def _save_steps(save_steps: int | Sequence[int] | None, total: int) -> list[int]:
    if save_steps is None:
        return []
    if isinstance(save_steps, int):
        if save_steps < 1:
            raise MemprobeError(
                f"save_steps={save_steps}: give a positive interval or a list of steps"
            )
        return list(range(save_steps, total + 1, save_steps))
    steps = sorted({int(s) for s in save_steps})
    bad = [s for s in steps if not 1 <= s <= total]
    if bad:
        raise MemprobeError(
            f"save steps {bad} are outside 1..{total} (the run has {total} optimizer steps)"
        )
    return steps


def _check_args(out_dir: Path, args: FinetuneArgs, resume: bool) -> None:
    """Write the run's arguments, or check a rerun against them (a different run is refused)."""
    from memprobe.results import write_json

    path = out_dir / ARGS_FILE
    if not path.exists():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise MemprobeError(
                f"{out_dir} exists and is not a memprobe finetune directory: choose a new --out"
            )
        write_json(path, asdict(args))
        return
    if not resume:
        raise MemprobeError(
            f"{out_dir} already holds a fine-tune run: resume it (same arguments) or choose a new --out"
        )
    old = json.loads(path.read_text(encoding="utf-8"))
    new = json.loads(json.dumps(asdict(args)))
    diff = [
        f"{k}: {old.get(k)!r} before, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if diff:
        raise MemprobeError(
            f"{out_dir} holds a run with other arguments ({'; '.join(diff)}): rerun with the same "
            "arguments to resume, or choose a new --out"
        )


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_state(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    scheduler,  # noqa: ANN001
    extra: dict[str, Any],
) -> None:
    """Write resume/step-N in a temp dir, rename it, then publish it by replacing latest.json."""
    from safetensors.torch import save_file

    from memprobe.io import staged_directory
    from memprobe.results import write_json

    root = out_dir / RESUME_DIR
    target = root / f"step-{step}"
    with staged_directory(target, replace=True) as tmp:  # files are fsynced before the rename
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
            tmp / "trainable.safetensors",
        )
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "state.pt",
        )
        write_json(tmp / "state.json", {"step": step, **extra})
    write_json(root / "latest.json", {"step": step, "dir": target.name})
    for old in root.iterdir():
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(
    out_dir: Path, model: torch.nn.Module, optimizer, scheduler
) -> dict[str, Any] | None:  # noqa: ANN001
    from safetensors.torch import load_file

    pointer = out_dir / RESUME_DIR / "latest.json"
    if not pointer.exists():
        return None
    state_dir = out_dir / RESUME_DIR / json.loads(pointer.read_text(encoding="utf-8"))["dir"]
    weights = load_file(state_dir / "trainable.safetensors")
    params = _trainable(model)
    if set(weights) != set(params):
        raise MemprobeError(
            f"{state_dir}: the saved trainable weights do not match this model; choose a new --out"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device))
    state = torch.load(state_dir / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return json.loads((state_dir / "state.json").read_text(encoding="utf-8"))


def _plain_dir(
    model: torch.nn.Module, tokenizer: Any, lora: bool, target: Path, provenance: dict
) -> None:
    """A Hugging Face directory that loads without memprobe, written in a temp dir and renamed."""
    from memprobe.io import staged_directory
    from memprobe.results import write_json

    with staged_directory(target, replace=True) as tmp:
        if lora:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            model.save_pretrained(tmp / "adapter")
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / PROVENANCE_FILE, provenance)


def _publish_final(
    out_dir: Path, model: torch.nn.Module, tokenizer: Any, lora: bool, provenance: dict
) -> None:
    """Write the final model into out_dir itself; the provenance file goes last, marking completion."""
    staging = out_dir / ".final"
    _plain_dir(model, tokenizer, lora, staging, provenance)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == PROVENANCE_FILE):
        dest = out_dir / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    staging.rmdir()


def _seen(order_examples: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(order_examples).items()))


def finetune(
    model: str | LoadedModel,
    train: str | Path | Sequence[dict],
    out_dir: str | Path,
    *,
    epochs: int = 1,
    lr: float = 5e-5,
    batch_size: int = 8,
    seq_len: int = 256,
    lora: bool = False,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    seed: int = 0,
    save_steps: int | Sequence[int] | None = None,
    state_every: int | None = None,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    resume: bool = True,
    progress: bool = True,
    device: str | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train `model` (a registered name, local path, or a LoadedModel, trained in place) on member
    documents; returns the provenance written to `out_dir/memprobe-finetune.json`.

    save_steps: an interval (every N optimizer steps) or a list of steps for `checkpoint-<step>/`;
    state_every: steps between resume states (default 100; also written at every checkpoint);
    steps: a fixed number of optimizer steps instead of `epochs` passes (the order keeps cycling
    through seeded epochs), so a defense on other data can take exactly a baseline's steps."""
    from tqdm.auto import tqdm

    from memprobe.models import load_model
    from memprobe.results import provenance as run_provenance

    for name, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("lora_rank", lora_rank),
    ):
        if not isinstance(value, int) or value < 1:
            raise MemprobeError(f"{name}={value!r}: give a whole number >= 1")
    if not lr > 0:
        raise MemprobeError(f"lr={lr}: give a positive learning rate")
    out_dir = Path(out_dir)
    docs, source = read_train_docs(train)
    loaded = load_model(model) if isinstance(model, str) else model
    base_sha = weights_sha256(loaded.model)
    examples = _examples(docs, loaded, seq_len)
    windows = {d["id"]: 0 for d in docs}
    for doc_id, _ in examples:
        windows[doc_id] += 1
    windows = {d["id"]: windows[d["id"]] // d.get("copies", 1) for d in docs}
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise MemprobeError(f"steps={steps!r}: give a whole number >= 1 (or None for `epochs`)")
    total = steps if steps is not None else steps_per_epoch * epochs
    args = FinetuneArgs(
        model=loaded.name,
        model_weights_sha256=base_sha,
        data_sha256=source["sha256"],
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        lora=lora,
        lora_rank=lora_rank,
        lora_alpha=float(lora_alpha if lora_alpha is not None else 2 * lora_rank),
        seed=seed,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        save_steps=_save_steps(save_steps, total),
        state_every=state_every or DEFAULT_STATE_EVERY,
        steps=steps,
    )
    _check_args(out_dir, args, resume)
    done_file = out_dir / PROVENANCE_FILE
    if done_file.exists():
        return json.loads(done_file.read_text(encoding="utf-8"))
    for partial in out_dir.glob("*.tmp-*"):  # a checkpoint a killed run was half-way through writing
        shutil.rmtree(partial, ignore_errors=True)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = loaded.model.to(dev)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # the adapter's random init
        net = get_peft_model(
            net,
            LoraConfig(
                r=lora_rank,
                lora_alpha=args.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    params = list(_trainable(net).values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total - step) / max(1, total - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = _load_state(out_dir, net, optimizer, scheduler) if resume else None
    reset_peak_rss()  # the provenance's peak_rss_mb is this training segment's
    step = state["step"] if state else 0
    tokens_seen = state["tokens_seen"] if state else 0
    elapsed = state["train_seconds"] if state else 0.0
    checkpoints = state["checkpoints"] if state else []
    segments = [*(state["segments"] if state else []), {"from_step": step}]
    losses = state["losses"] if state else []
    pad_id = next(
        i
        for i in (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id, 0)
        if i is not None
    )
    n_params = sum(p.numel() for p in params)

    def record(done_step: int) -> dict[str, Any]:
        return {
            **run_provenance(seed),
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "base_model": {"name": loaded.name, "info": loaded.info, "weights_sha256": base_sha},
            "data": {
                **source,
                "documents": len(docs),
                "examples_per_epoch": len(examples),
                "docs": [
                    {"id": d["id"], "copies": d.get("copies", 1), "windows": windows[d["id"]]}
                    for d in docs
                ],
                "seen_unit": "training examples (seq_len windows) of the document; one pass over "
                "a document = `windows` examples",
                "order": "memprobe.lab.finetune.epoch_batches: per epoch a torch.randperm seeded "
                f"seed*1000003+epoch, length-sorted groups of {GROUP_BATCHES} batches, batches "
                "shuffled; documents end with EOS, cut into seq_len windows, repeated `copies` times",
            },
            "hyperparameters": {
                k: v for k, v in asdict(args).items() if k not in ("model", "data_sha256")
            },
            "trainable_parameters": n_params,
            "device": str(dev),
            "steps": {"done": done_step, "total": total, "per_epoch": steps_per_epoch},
            "tokens_seen": tokens_seen,
            "train_seconds": round(elapsed, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "tokens_per_second": round(tokens_seen / elapsed, 1) if elapsed else None,
            "segments": segments,
            "checkpoints": checkpoints,
            "losses": losses,
            "complete": done_step == total,
        }

    lengths = [len(ids) for _, ids in examples]

    cache: dict[int, list[list[int]]] = {}

    def batches_of(epoch: int) -> list[list[int]]:
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_batches(lengths, batch_size, seed, epoch)
        return cache[epoch]

    def seen_until(done_step: int) -> dict[str, int]:
        ids = []
        for s in range(done_step):
            ids += [examples[i][0] for i in batches_of(s // steps_per_epoch)[s % steps_per_epoch]]
        return _seen(ids)

    net.train()
    bar = tqdm(total=total, initial=step, disable=not progress, desc="finetune", unit="step")
    started = time.perf_counter()
    while step < total:
        epoch, b = divmod(step, steps_per_epoch)
        chunk = [examples[i] for i in batches_of(epoch)[b]]
        batch = _batch(chunk, pad_id, dev)
        loss = net(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        tokens_seen += int(batch["attention_mask"].sum())
        losses.append(round(loss.item(), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        now = time.perf_counter()
        elapsed, started = elapsed + (now - started), now
        if step in args.save_steps:
            checkpoints.append(
                {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "tokens_seen": tokens_seen,
                    "seen": seen_until(step),
                }
            )
            _plain_dir(net, loaded.tokenizer, lora, out_dir / f"checkpoint-{step}", record(step))
        if step % args.state_every == 0 or step in args.save_steps:
            segments[-1]["to_step"] = step
            _save_state(
                out_dir,
                step,
                net,
                optimizer,
                scheduler,
                {
                    "tokens_seen": tokens_seen,
                    "train_seconds": elapsed,
                    "checkpoints": checkpoints,
                    "segments": segments,
                    "losses": losses,
                },
            )
        started = time.perf_counter()
    bar.close()
    segments[-1]["to_step"] = step
    net.eval()
    final = record(step)
    final["seen_total"] = seen_until(step)
    _publish_final(out_dir, net, loaded.tokenizer, lora, final)
    shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)
    return final


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
