"""Fine-tuning throughput: `memprobe.lab.finetune` vs a plain PyTorch loop vs Hugging Face `Trainer`.

All three train the same fresh copy of the model on the same batches (the lab's member windows in
the order `memprobe.lab.finetune.epoch_batches` gives, so every peer pads alike) with the same AdamW,
gradient clipping and linear schedule; their per-step losses are compared to show they do the same
work. Throughput = real (non-pad) tokens / seconds of the training loop; memprobe's whole call (base
weight hash, final save) is reported beside it. Peers run --rounds times in rotating order and the
best round of each counts (as in bench_capture: warm-up and load drift on a shared CPU).

    .venv/bin/python benchmarks/bench_finetune.py                  # smollm2-135m, `small` lab
    .venv/bin/python benchmarks/bench_finetune.py --quick --out /tmp/bench_finetune.json  # tiny-llama
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from memprobe.lab import build_lab, load_lab
from memprobe.lab.finetune import _batch, _examples, epoch_batches, finetune
from memprobe.models import LoadedModel, load_model

LR, SEED = 1e-4, 0


def training_docs(loaded: LoadedModel, members: list[dict], steps: int, batch_size: int, seq_len: int) -> list[dict]:
    """Member documents (copies 1) whose windows fill exactly `steps` full batches: no short batch."""
    want, docs, n = steps * batch_size, [], 0
    for d in members:
        k = len(_examples([{**d, "copies": 1}], loaded, seq_len))
        if n + k <= want:
            docs.append({"id": d["id"], "text": d["text"], "copies": 1})
            n += k
        if n == want:
            return docs
    raise SystemExit(f"the lab's members give only {n} windows, {want} needed: lower --steps")


def linear(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (total - s) / total))


def run_memprobe(base: LoadedModel, docs: list[dict], batch_size: int, seq_len: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        loaded = LoadedModel(base.name, copy.deepcopy(base.model), base.tokenizer, base.info)
        t = time.perf_counter()
        r = finetune(loaded, docs, out / "ft", epochs=1, lr=LR, batch_size=batch_size, seq_len=seq_len, seed=SEED,
                     progress=False, state_every=10**9)
        call = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"tokens": r["tokens_seen"], "seconds": r["train_seconds"], "call_seconds": call, "losses": r["losses"]}


def run_plain(base: LoadedModel, batches: list[dict]) -> dict:
    """The plain PyTorch peer: its loop is written out here on purpose, not taken from
    memprobe.lab.finetune, so the comparison measures memprobe's loop against an independent one."""
    model = copy.deepcopy(base.model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    scheduler = linear(optimizer, len(batches))
    losses, tokens = [], 0
    t = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(round(loss.item(), 5))
        tokens += int(batch["attention_mask"].sum())
    return {"tokens": tokens, "seconds": time.perf_counter() - t, "losses": losses}


def run_trainer(base: LoadedModel, rows: list[list[int]], batch_size: int, pad_id: int) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class InOrder(Trainer):  # the same batches as the other peers: no shuffling
        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.losses: list[float] = []

    def collate(items: list[dict]) -> dict:
        return _batch([("", it["input_ids"]) for it in items], pad_id, torch.device("cpu"))

    out = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch_size, learning_rate=LR,
                                 num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                                 max_grad_norm=1.0, optim="adamw_torch", save_strategy="no", logging_steps=1,
                                 report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                                 seed=SEED, remove_unused_columns=False)
        trainer = InOrder(model=copy.deepcopy(base.model), args=args, data_collator=collate,
                          train_dataset=[{"input_ids": r} for r in rows])
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
        losses = [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"tokens": sum(len(r) for r in rows), "seconds": seconds, "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama on the tiny lab (plumbing only)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 20; quick 6)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_finetune.json"))
    args = p.parse_args()
    model_name, preset = ("tiny-llama", "tiny") if args.quick else ("smollm2-135m", "small")
    steps, batch_size, seq_len = args.steps or (6 if args.quick else 20), 4 if args.quick else 8, 256
    lab = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    try:
        build_lab(lab, preset=preset, seed=SEED)
        members, _, _ = load_lab(lab)
    finally:
        shutil.rmtree(lab, ignore_errors=True)
    base = load_model(model_name)
    docs = training_docs(base, members, steps, batch_size, seq_len)
    examples = _examples(docs, base, seq_len)
    order = epoch_batches([len(ids) for _, ids in examples], batch_size, SEED, 0)
    pad_id = next(i for i in (base.tokenizer.pad_token_id, base.tokenizer.eos_token_id, 0) if i is not None)
    batches = [_batch([examples[i] for i in b], pad_id, torch.device("cpu")) for b in order]
    rows = [examples[i][1] for b in order for i in b]
    peers = {"memprobe_finetune": lambda: run_memprobe(base, docs, batch_size, seq_len),
             "plain_pytorch": lambda: run_plain(base, batches),
             "hf_trainer": lambda: run_trainer(base, rows, batch_size, pad_id)}
    names, per_round, losses = list(peers), {n: [] for n in peers}, {}
    load = {"start": os.getloadavg()}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            got = peers[name]()
            per_round[name].append(got["tokens"] / got["seconds"])
            losses[name] = got["losses"]
            if name == "memprobe_finetune":
                per_round.setdefault("memprobe_finetune_whole_call", []).append(got["tokens"] / got["call_seconds"])
            print(f"round {r}: {name} {per_round[name][-1]:.0f} tok/s", flush=True)
    load["end"] = os.getloadavg()
    ref = losses["plain_pytorch"]
    report = {
        "model": base.info, "lab_preset": preset, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
        "lr": LR, "tokens_per_run": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "threads": torch.get_num_threads(), "rounds": args.rounds, "load_average": load,
        "tok_s_per_round": per_round, "tok_s_best": {n: max(v) for n, v in per_round.items()},
        "losses": losses,
        "max_abs_loss_diff_vs_plain": {n: max(abs(a - b) for a, b in zip(v, ref, strict=True))
                                       for n, v in losses.items() if len(v) == len(ref)},
    }
    report["vs_plain_pytorch"] = {n: v / report["tok_s_best"]["plain_pytorch"] for n, v in report["tok_s_best"].items()}
    from memprobe.results import save_results

    save_results(args.out, report, seed=SEED)
    for n, v in report["tok_s_best"].items():
        print(f"  {n:32s} {v:9.1f} tok/s  {report['vs_plain_pytorch'][n]:5.2f}x plain PyTorch")
    print(f"max |loss - plain loss| per step: {report['max_abs_loss_diff_vs_plain']}; wrote {args.out}")


if __name__ == "__main__":
    main()
