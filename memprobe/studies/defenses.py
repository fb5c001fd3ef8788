"""The defenses study: every defense from one base, lab and step budget, judged by one evaluation.

Stages (each written atomically under `out_dir` and skipped when its output is complete, so a killed
run resumes stage by stage; a fine-tune also resumes inside itself): lab -> undefended fine-tune ->
training-time defenses (dedup, RMFT at each fraction, DP-SGD at each epsilon), all with the
baseline's optimizer steps and batch size (dedup and RMFT through `finetune(steps=...)`; DP-SGD
with the same epochs over one record per document presentation) -> post-hoc defenses of the
undefended model (magnitude and Wanda pruning at each sparsity, neuron ablation, learned edit),
built from the build split -> `memprobe.defend.evaluate.measure` of every model on validation and
test -> `DefenseStudy` (knob chosen on validation, reported on test, MaxTER/AURC, Pareto figure).
Fine-tuned weights stay in `out_dir/models` (not for committing); results are JSON.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memprobe.defend.evaluate import (
    DefenseStudy,
    EvalConfig,
    check_pair,
    hard_texts,
    measure,
    split_lab,
)
from memprobe.errors import MemprobeError

ALL_METHODS = ("dedup", "rmft", "dp", "prune-magnitude", "prune-wanda", "ablate", "edit")


@dataclass(frozen=True)
class DefenseConfig:
    """What the study trains and how; `quick` settings come from `DefenseConfig.quick()`."""

    model: str = "smollm2-135m"
    lab_preset: str = "small"
    lab_seed: int = 0
    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 8
    seq_len: int = 256
    lora: bool = True
    dp_lr: float = 2e-3
    methods: tuple[str, ...] = ALL_METHODS
    rmft_fractions: tuple[float, ...] = (0.5, 1.0)
    dp_epsilons: tuple[float, ...] = (8.0, 1.0)
    sparsities: tuple[float, ...] = (0.1, 0.3, 0.5)
    ablate_fractions: tuple[float, ...] = (0.001, 0.005, 0.02)
    edit_strengths: tuple[float, ...] = (0.5, 1.0, 2.0)
    seed: int = 0
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def quick(cls) -> DefenseConfig:
        return cls(model="tiny-llama", lab_preset="tiny", epochs=4, lr=3e-3, batch_size=8, seq_len=512,
                   lora=False, dp_lr=5e-2, dp_epsilons=(8.0,), sparsities=(0.3,), ablate_fractions=(0.02,),
                   edit_strengths=(1.0,), evaluation=EvalConfig(extraction_samples=2, exposure_samples=100,
                                                                n_boot=50, max_tokens=128, sample_prompts=1))


def _cached(path: Path, compute: Any) -> Any:
    from memprobe.results import write_json

    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    write_json(path, value)
    return value


def run_defenses(cfg: DefenseConfig, out_dir: str | Path, *, progress: bool = False) -> DefenseStudy:
    """Run (or resume) the whole study; returns the result (also saved as `defenses.json`)."""
    from memprobe.defend.dedup import deduplicate
    from memprobe.defend.dp import dp_finetune
    from memprobe.defend.posthoc import build_posthoc, with_knob
    from memprobe.defend.prune import prune_mlp
    from memprobe.defend.rmft import rmft
    from memprobe.lab.corpus import build_lab, load_lab
    from memprobe.lab.finetune import finetune
    from memprobe.models import LoadedModel, load_model

    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise MemprobeError(f"unknown defense methods {unknown}: choose from {', '.join(ALL_METHODS)}")
    out = Path(out_dir)
    lab_dir = out / "lab"
    if not (lab_dir / "manifest.json").exists():
        build_lab(lab_dir, preset=cfg.lab_preset, seed=cfg.lab_seed)
    members, nonmembers, _ = load_lab(lab_dir)
    splits = split_lab(members, nonmembers, seed=cfg.seed)
    base = load_model(cfg.model)
    hard = _cached(out / "eval" / "hard_texts.json",
                   lambda: hard_texts(base, seed=cfg.seed, sample_prompts=cfg.evaluation.sample_prompts))
    train_args = dict(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                      lora=cfg.lora, seed=cfg.seed, progress=progress)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    baseline_prov = finetune(cfg.model, members, models / "baseline", **train_args)
    steps = baseline_prov["steps"]["total"]
    notes: dict[str, Any] = {"steps": steps, "equalised": "dedup and RMFT: the baseline's optimizer steps "
                             "and batch size (finetune(steps=...)); DP-SGD: the same epochs over one record "
                             "per document presentation (expected batches of batch_size)"}

    def evaluate(name: str, loaded: LoadedModel, seen: list[str]) -> dict[str, Any]:
        check_pair(base, loaded)
        return {split: _cached(out / "eval" / f"{name}-{split}.json",
                               lambda split=split: measure(loaded, base, splits[split]["members"],
                                                           splits[split]["nonmembers"], hard, cfg.evaluation,
                                                           seen_ids=seen))
                for split in ("validation", "test")}

    all_ids = [d["id"] for d in members]
    ft = load_model(str(models / "baseline"))
    baseline = evaluate("baseline", ft, all_ids)
    methods: dict[str, dict[Any, dict[str, Any]]] = {}
    if "dedup" in cfg.methods:
        docs, report = deduplicate(members)
        notes["dedup"] = report
        finetune(cfg.model, docs, models / "dedup", **train_args, steps=steps)
        methods["dedup"] = {"exact+near": evaluate("dedup", load_model(str(models / "dedup")),
                                                   [d["id"] for d in docs])}
    if "rmft" in cfg.methods:
        methods["rmft"] = {}
        for fraction in cfg.rmft_fractions:
            docs, report = rmft(members, fraction=fraction, seed=cfg.seed)
            notes[f"rmft-{fraction}"] = report
            finetune(cfg.model, docs, models / f"rmft-{fraction}", **train_args, steps=steps)
            methods["rmft"][fraction] = evaluate(f"rmft-{fraction}", load_model(str(models / f"rmft-{fraction}")),
                                                 all_ids)
    if "dp" in cfg.methods:
        methods["dp"] = {}
        for eps in cfg.dp_epsilons:
            prov = dp_finetune(cfg.model, members, models / f"dp-{eps}", epsilon=eps, epochs=cfg.epochs,
                               lr=cfg.dp_lr, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
            notes[f"dp-{eps}"] = {"privacy": prov["privacy"], "steps": prov["steps"]}
            methods["dp"][eps] = evaluate(f"dp-{eps}", load_model(str(models / f"dp-{eps}" / "model")), all_ids)
    calibration = [ft.encode(d["text"])[: cfg.seq_len] for d in splits["build"]["nonmembers"]]
    for kind in ("magnitude", "wanda"):
        if f"prune-{kind}" in cfg.methods:
            methods[f"prune-{kind}"] = {}
            for s in cfg.sparsities:
                pruned = LoadedModel(f"{ft.name}+prune-{kind}-{s}", copy.deepcopy(ft.model), ft.tokenizer, ft.info)
                notes[f"prune-{kind}-{s}"] = prune_mlp(pruned.model, s, method=kind, calibration=calibration)
                methods[f"prune-{kind}"][s] = evaluate(f"prune-{kind}-{s}", pruned, all_ids)
    for method, knobs in (("ablate", cfg.ablate_fractions), ("edit", cfg.edit_strengths)):
        if method in cfg.methods:
            build = (splits["build"]["members"], splits["build"]["nonmembers"])
            edit = build_posthoc(ft, method, *build, seed=cfg.seed) if method == "edit" else None
            methods[method] = {}
            for knob in knobs:
                net = with_knob(ft, method, edit, knob, *build, seed=cfg.seed)
                methods[method][knob] = evaluate(f"{method}-{knob}", LoadedModel(f"{ft.name}+{method}-{knob}", net,
                                                                              ft.tokenizer, ft.info), all_ids)
    notes["config"] = json.loads(json.dumps(asdict(cfg)))
    notes["splits"] = {s: {k: len(v) for k, v in parts.items()} for s, parts in splits.items()}
    study = DefenseStudy(cfg.evaluation, baseline, methods, notes)
    study.save(out / "defenses.json")
    return study
