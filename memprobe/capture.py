"""Stream activations of chosen sites into an ActivationStore, batch by batch.

Why streaming: a capture of every site of even a 135M model is ~250 KB per token, so the corpus
never sits in memory; each batch becomes one committed shard, and a killed capture resumes from
the last one. Texts are tokenised once here and every backend gets the same token ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memprobe.backends import make_backend
from memprobe.backends.torch_hooks import HookPoint, hooked
from memprobe.documents import TokenizedDoc, tokenize_documents  # noqa: F401  (capture's tokenisation)
from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.sites import hook_points, resolve
from memprobe.store import ActivationStore, StoreWriter
from memprobe.token_stats import STAT_COLUMNS, next_token_stats


def input_digest(docs: Sequence[TokenizedDoc]) -> str:
    """A hash of the exact token ids of the inputs: a store is reused only for the same inputs."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.id, d.token_ids]).encode())
    return h.hexdigest()


def batches(lengths: Sequence[int], pending: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group pending documents (longest first) so each padded batch holds <= batch_tokens tokens."""
    order = sorted(pending, key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (ids, attention_mask)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_id(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def capture(
    loaded: LoadedModel,
    docs: Sequence[dict[str, Any]],
    sites: str | list[str],
    out: str | Path,
    *,
    backend: str = "hooks",
    dtype: str = "float32",
    batch_tokens: int = 2048,
    token_columns: dict[str, dict[str, Sequence[float]]] | None = None,
    token_stats: bool = False,
    truncate: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Capture `sites` of `loaded` over `docs` ({"id", "text", ...}) into a store at `out`.

    `token_columns` optionally attaches per-token label columns: {column: {doc_id: values}} with
    one value per token (e.g. `memorized`, `target_prob` from memprobe.labels). `token_stats` also
    stores, from the logits of the same forward, the per-token statistics of
    `memprobe.token_stats` (columns `STAT_COLUMNS`; NaN at each document's first token, which has
    no prediction): labels (`memprobe.labels.token_labels_from_store`) and membership scores then
    need no second pass. Re-running with the same arguments resumes an interrupted capture;
    different arguments are refused.
    """
    tokenized = tokenize_documents(loaded, docs, truncate=truncate)
    sites = resolve(loaded.model, sites)
    if token_stats:
        _check_token_stats(backend, token_columns)
    runner = make_backend(backend, loaded)
    lengths = [len(d.token_ids) for d in tokenized]
    widths = _widths(runner, sites, loaded)
    config = {
        "model": loaded.info,
        "backend": backend,
        "tokenization": "memprobe LoadedModel.encode (add_special_tokens=True)",
        "inputs_sha256": input_digest(tokenized),
        "truncate": truncate,
        "token_columns": sorted(token_columns or {}),
        "token_stats": list(STAT_COLUMNS) if token_stats else [],
    }
    documents = [{"id": d.id, "n_tokens": len(d.token_ids), **d.fields} for d in tokenized]
    writer = StoreWriter(out, config=config, sites=sites, widths=widths, dtype=dtype, documents=documents,
                         overwrite=overwrite)
    pending = writer.pending()
    pad = pad_id(loaded)
    device = loaded.device
    bar = tqdm(total=sum(lengths[i] for i in pending), unit="tok", desc="capture", disable=not progress)
    # One writer thread serialises, hashes and fsyncs shard n while the model runs batch n+1 (hashing,
    # writes and fsync release the GIL). At most one shard waits, so memory stays bounded by two batches.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="memprobe-store") as pool:
        in_flight: Future | None = None
        for group in batches(lengths, pending, batch_tokens):
            ids, mask = pad_batch([tokenized[i].token_ids for i in group], pad)
            keep = mask.bool()
            if token_stats:
                acts, logits = run_to_logits(loaded, ids.to(device), mask.to(device), sites)
                stats = stat_columns(logits, ids, keep)
                del logits
            else:
                acts, stats = runner.run(ids.to(device), mask.to(device), sites), {}
            rows = {s: _rows(acts[s], keep) for s in sites}  # row-major: doc by doc
            doc_index = torch.cat([torch.full((lengths[i],), i, dtype=torch.long) for i in group])
            position = torch.cat([torch.arange(lengths[i]) for i in group])
            token_id = ids[keep]
            columns = {**(_columns(token_columns, [tokenized[i] for i in group]) or {}), **stats} or None
            if in_flight is not None:
                bar.update(in_flight.result())
            in_flight = pool.submit(_commit, writer, group, rows, doc_index, position, token_id, columns)
        if in_flight is not None:
            bar.update(in_flight.result())
    bar.close()
    writer.finish()
    return ActivationStore.open(out)


def _check_token_stats(backend: str, token_columns: dict[str, Any] | None) -> None:
    if backend != "hooks":
        raise MemprobeError(
            f"token_stats needs the logits of the capture's own forward, which the {backend!r} backend "
            "does not return (it stops after the last site): capture with backend='hooks', or label "
            "separately with memprobe.labels.token_labels"
        )
    clash = sorted(set(token_columns or {}) & set(STAT_COLUMNS))
    if clash:
        raise MemprobeError(
            f"token_columns {clash} have the names of token-stat columns that token_stats computes: "
            "rename them, or drop them and use the computed ones"
        )


def run_to_logits(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  sites: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The sites' activations and the logits of ONE forward: hooks that do not stop it early.

    Why not the hooks backend: it ends the forward after the last site, and a second forward for
    the logits would double the cost of labels; the final logits come from the model's output.
    """
    acts: dict[str, torch.Tensor] = {}
    model = loaded.model
    with hooked(model, hook_points(model, sites), acts, stop_early=False), torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = set(sites) - set(acts)
    if missing:
        raise MemprobeError(f"sites {sorted(missing)} never fired during the forward pass: check the model's forward path")
    if getattr(out, "logits", None) is None:
        raise MemprobeError(f"{type(model).__name__} returns no logits, so it has no token statistics: "
                            "capture without token_stats")
    return acts, out.logits


def stat_columns(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token stat columns of a right-padded batch, rows of real tokens only (doc by doc).

    Row t of a document holds the statistics of token t given tokens < t; row 0 is NaN.
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in STAT_COLUMNS}
    nan = torch.full((1,), float("nan"))
    for row, n in enumerate(keep.sum(1).tolist()):  # per row: padding costs no log-softmax
        stats = next_token_stats(logits[row, : n - 1], ids[row, 1:n].to(logits.device))
        for name in STAT_COLUMNS:
            parts[name] += [nan, getattr(stats, name).float().cpu()]
    return {name: torch.cat(p) for name, p in parts.items()}


def _rows(acts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (tokens, width) rows of a (batch, seq, width) activation that are real tokens, not padding."""
    if bool(keep.all()):
        return acts.reshape(-1, acts.shape[-1]).cpu()  # a view when nothing is padded: no copy
    return acts[keep.to(acts.device)].cpu()


def _commit(writer: StoreWriter, group: list[int], rows: dict[str, torch.Tensor], doc_index: torch.Tensor,
            position: torch.Tensor, token_id: torch.Tensor, columns: dict[str, torch.Tensor] | None) -> int:
    """Write one shard (runs on the writer thread); returns its row count for the progress bar."""
    writer.write_shard(group, rows, doc_index, position, token_id, columns)
    return int(doc_index.numel())


def _widths(runner, sites: list[str], loaded: LoadedModel) -> dict[str, int]:
    """Width of each site, from a one-token forward (cheap, and true for any module path)."""
    one = torch.tensor([loaded.encode("a")[:1]], device=loaded.device)
    acts = runner.run(one, torch.ones_like(one), sites)
    return {s: int(acts[s].shape[-1]) for s in sites}


def _columns(token_columns: dict[str, dict[str, Sequence[float]]] | None, docs: list[TokenizedDoc]) -> dict[str, torch.Tensor] | None:
    if not token_columns:
        return None
    out = {}
    for name, per_doc in token_columns.items():
        parts = []
        for d in docs:
            values = per_doc.get(d.id)
            if values is None or len(values) != len(d.token_ids):
                raise MemprobeError(
                    f"label column '{name}' has {None if values is None else len(values)} values for "
                    f"document {d.id!r}, which has {len(d.token_ids)} tokens: label the same texts with the same model"
                )
            parts.append(torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32))
        out[name] = torch.cat(parts)
    return out


# Augmented views of images: the model-running half of LayerMem, UnitMem and a-priori PSMI. The
# analyses (memprobe.localize, memprobe.predict) read the tensors these yield and never run a model.


def module_points(sites: Sequence[str] | Mapping[str, HookPoint]) -> dict[str, HookPoint]:
    """{name: HookPoint}: module paths read at their output, or the given hook points."""
    points = dict(sites) if isinstance(sites, Mapping) else {s: HookPoint(s, "output") for s in sites}
    if not points:
        raise MemprobeError("no sites given: name at least one module whose output is a representation")
    return points


def augmented_views(
    images: torch.Tensor,
    *,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    n_aug: int = 0,
    include_original: bool = True,
    batch_size: int = 128,
    seed: int = 0,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Batches of views (V, b, ...) of `images`, `batch_size` points at a time: view 0 the image itself
    (when `include_original`), then `n_aug` draws of `augment(x, generator)` from one generator seeded
    by `seed`; `preprocess` (input normalisation) runs on the views after augmentation."""
    if images.ndim < 1 or images.shape[0] == 0:
        raise MemprobeError(f"inputs must be a non-empty batch (N, ...), got shape {tuple(images.shape)}")
    if n_aug and augment is None:
        raise MemprobeError("n_aug > 0 needs an augment(x, generator) function")
    if not include_original and n_aug < 1:
        raise MemprobeError(f"no views: n_aug must be >= 1 without the original, got {n_aug}")
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        views = torch.cat(([x] if include_original else []) + [augment(x, gen) for _ in range(n_aug)])
        if preprocess is not None:
            views = preprocess(views)
        yield views.reshape(-1, x.shape[0], *views.shape[1:])


def capture_views(
    model: torch.nn.Module, views: torch.Tensor, sites: Sequence[str] | Mapping[str, HookPoint]
) -> dict[str, torch.Tensor]:
    """{site: (V, b, ...)}: the value at each site for every view of `views` (V, b, ...), in one
    forward of all V*b views on the model's device (the forward stops after the last site)."""
    from memprobe.backends.torch_hooks import run_with_hooks

    dev = next(iter(model.parameters()), torch.empty(0)).device
    n_views, b = views.shape[:2]
    reps = run_with_hooks(model, module_points(sites), views.flatten(0, 1).to(dev))
    return {s: r.reshape(n_views, b, *r.shape[1:]) for s, r in reps.items()}


def capture_augmented(
    models: torch.nn.Module | Mapping[str, torch.nn.Module],
    images: torch.Tensor,
    sites: Sequence[str] | Mapping[str, HookPoint],
    **views: Any,
) -> Iterator[dict[str, torch.Tensor]] | Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Per batch of `augmented_views(images, **views)`: {site: (V, b, ...)} for one model, or
    {model name: {site: ...}} for a mapping of models, which then all see the very same views
    (what SSLMem's f and g need). Sites are checked (closest names) before any forward."""
    from memprobe.backends.torch_hooks import resolve_module

    single = isinstance(models, torch.nn.Module)
    model_map = {"model": models} if single else dict(models)
    if not model_map:
        raise MemprobeError("no models given")
    points = module_points(sites)
    for model in model_map.values():
        for p in points.values():
            resolve_module(model, p.module)
        model.eval()
    batches = augmented_views(images, **views)

    def run() -> Iterator[Any]:
        # no_grad per batch, never across a yield: a generator suspended inside `no_grad` (say, by
        # a consumer that raised) would leave gradients off in the caller's thread.
        for batch in batches:
            with torch.no_grad():
                out = {name: capture_views(m, batch, points) for name, m in model_map.items()}
            yield out["model"] if single else out

    return run()


@torch.no_grad()
def capture_outputs(
    model: torch.nn.Module, inputs: torch.Tensor, modules: Sequence[str], *, batch_size: int = 1024
) -> dict[str, np.ndarray]:
    """Outputs of `modules` for every input row, flattened to (n, features): what a-priori PSMI reads."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for batch in augmented_views(inputs, batch_size=batch_size):
        for m, r in capture_views(model, batch, modules).items():
            parts[m].append(r[0].flatten(1))
    return {m: torch.cat(v).numpy() for m, v in parts.items()}
