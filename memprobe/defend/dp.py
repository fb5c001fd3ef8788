"""DP-SGD fine-tuning of LoRA adapters with opacus (Abadi et al. 2016), one document per record.

Why these choices:
- the privacy unit is one DOCUMENT presentation: each member (each of its `copies`) is one record,
  cut to its first `seq_len` tokens (the report counts what was cut), so one record's gradient is
  clipped and noised as a whole. A document repeated k times (a canary with copies k) is k records
  and gets only group privacy: (k eps, k e^{(k-1) eps} delta) at best; the result says so;
- only the LoRA parameters train (peft, all linear layers, the same config as
  `memprobe.lab.finetune`), on CPU unless a device is given: per-sample gradients of the adapters
  are small, those of a full model are not;
- opacus's `make_private_with_epsilon` with its default accountant (PRV in opacus 1.6) and Poisson
  sampling at rate batch_size / N; delta defaults to 1/N; the epsilon actually spent is read back
  from the accountant and reported with its delta;
- the same number of optimizer steps as the undefended run: `epochs` passes of ceil(N / batch_size)
  expected batches, which is the baseline's step count when every document fits in one window.
The fine-tuned model is written like `memprobe.lab.finetune`'s (a plain HF directory, adapter beside
it) by the same helper; a run whose output is complete is not redone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.resource_use import peak_rss_mb, reset_peak_rss

EPSILONS = (8.0, 1.0)


def dp_finetune(
    model: str | LoadedModel,
    train: str | Path | Sequence[dict],
    out_dir: str | Path,
    *,
    epsilon: float,
    delta: float | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    seq_len: int = 256,
    lora_rank: int = 8,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train LoRA adapters on member documents under (epsilon, delta)-DP; returns the provenance.

    `model`: a registered name or path (loaded fresh), or a LoadedModel (wrapped in place). The model
    goes to `out_dir/model`, the provenance (privacy spent, steps) to `out_dir/memprobe-finetune.json`
    last; a complete run is returned as is. No mid-run resume: a killed run restarts from step 0."""
    from opacus import PrivacyEngine
    from peft import LoraConfig, get_peft_model

    from memprobe.lab.finetune import PROVENANCE_FILE, _plain_dir, read_train_docs
    from memprobe.models import load_model
    from memprobe.results import provenance as run_provenance

    if not isinstance(epsilon, (int, float)) or not 0 < epsilon <= 100:
        raise MemprobeError(f"epsilon={epsilon!r}: give a privacy budget in (0, 100] (the study uses {EPSILONS})")
    if max_grad_norm <= 0 or batch_size < 1 or epochs < 1 or seq_len < 2:
        raise MemprobeError("need max_grad_norm > 0, batch_size >= 1, epochs >= 1 and seq_len >= 2")
    out_dir = Path(out_dir)
    if (out_dir / PROVENANCE_FILE).exists():
        return json.loads((out_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    docs, source = read_train_docs(train)
    loaded = load_model(model) if isinstance(model, str) else model
    eos, pad = loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    records, truncated = [], 0
    for doc in docs:
        ids = loaded.encode(doc["text"]) + ([eos] if eos is not None else [])
        truncated += len(ids) > seq_len
        records += [ids[:seq_len]] * int(doc.get("copies", 1))
    n = len(records)
    delta = 1.0 / n if delta is None else delta
    if not 0 < delta < 1:
        raise MemprobeError(f"delta={delta}: give a probability in (0, 1) (default 1/N = {1 / n:.3g})")
    width = max(len(r) for r in records)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(records):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    dataset = torch.utils.data.TensorDataset(ids, mask)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, generator=torch.Generator().manual_seed(seed)
    )
    dev = torch.device(device)
    torch.manual_seed(seed)
    net = get_peft_model(
        loaded.model.to(dev),
        LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                   target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    engine = PrivacyEngine()
    private, optimizer, private_loader = engine.make_private_with_epsilon(
        module=net, optimizer=optimizer, data_loader=loader, target_epsilon=float(epsilon),
        target_delta=delta, epochs=epochs, max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator(device=dev).manual_seed(seed),
    )
    private.train()
    losses, steps, tokens, started = [], 0, 0, time.perf_counter()
    reset_peak_rss()
    for _ in range(epochs):
        for batch_ids, batch_mask in private_loader:
            optimizer.zero_grad(set_to_none=True)
            if len(batch_ids):
                batch_ids, batch_mask = batch_ids.to(dev), batch_mask.to(dev)
                logits = private(input_ids=batch_ids, attention_mask=batch_mask).logits[:, :-1]
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), batch_ids[:, 1:], reduction="none")
                keep = batch_mask[:, 1:].float()
                per_record = (nll * keep).sum(1) / keep.sum(1).clamp_min(1)
                loss = per_record.mean()  # opacus's loss_reduction="mean"
                loss.backward()
                losses.append(round(loss.item(), 5))
                tokens += int(batch_mask.sum())
            optimizer.step()
            steps += 1
    spent = float(engine.get_epsilon(delta))
    private._close()
    net.eval()
    max_copies = max(int(d.get("copies", 1)) for d in docs)
    provenance = {
        **run_provenance(seed),
        "defense": "dp-sgd",
        "base_model": {"name": loaded.name, "info": loaded.info},
        "data": {**source, "documents": len(docs), "records": n, "truncated_documents": truncated},
        "privacy": {
            "target_epsilon": float(epsilon),
            "epsilon_spent": spent,
            "delta": delta,
            "accountant": engine.accountant.mechanism(),
            "noise_multiplier": float(optimizer.noise_multiplier),
            "max_grad_norm": max_grad_norm,
            "sample_rate": 1 / len(loader),
            "unit": "one document presentation (a member with copies k is k records)",
            "group_privacy": f"a document with k copies (up to {max_copies} here) is protected only "
            "as a group of k records: (k*eps, k*e^((k-1)*eps)*delta) at best",
            "trained": f"LoRA adapters (rank {lora_rank}, all linear layers) on {dev}",
        },
        "hyperparameters": {"epochs": epochs, "lr": lr, "optimizer": "SGD momentum 0.9",
                            "batch_size": batch_size, "seq_len": seq_len, "lora_rank": lora_rank},
        "steps": {"done": steps, "expected": epochs * len(loader)},
        "tokens_seen": tokens,
        "train_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "losses": losses,
        "complete": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _plain_dir(net, loaded.tokenizer, True, out_dir / "model", provenance)
    from memprobe.results import write_json

    write_json(out_dir / PROVENANCE_FILE, provenance)
    return provenance


def group_epsilon(epsilon: float, copies: int) -> float:
    """The epsilon a record repeated `copies` times gets from group privacy: copies * epsilon."""
    return copies * epsilon if math.isfinite(epsilon) else epsilon
