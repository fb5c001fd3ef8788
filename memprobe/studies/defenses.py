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
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from memprobe.defend.evaluate import (
    DefenseStudy,
    EvalConfig,
    check_pair,
    hard_texts,
    measure,
    reference_losses,
    split_lab,
)
from memprobe.errors import MemprobeError
from memprobe.resource_use import stage_cost

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
    edit_steps: int = 30
    edit_lr: float = 3e-3
    seed: int = 0
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def cpu(cls) -> DefenseConfig:
        """smollm2-135m on 2 CPU cores in one session: the `defense` lab (fewer people, values seen
        more often), LoRA at a rate that memorizes PII in 4 epochs, two or three knobs per method,
        greedy + 4 samples per PII prompt. The learned edit trains 8 Adam steps at lr 1.25e-2, not 30 at
        3e-3: the fewest steps that, on the validation split, suppress at least as much at no more
        perplexity, so the build fits in 10% of the fine-tune (benchmarks/bench_edit_build.py)."""
        return cls(lab_preset="defense", epochs=4, lr=1e-3, dp_lr=5e-3, sparsities=(0.1, 0.3),
                   ablate_fractions=(0.001, 0.005), edit_strengths=(0.5, 1.0), edit_steps=8, edit_lr=1.25e-2,
                   evaluation=EvalConfig(extraction_samples=4))

    @classmethod
    def cpu_full(cls) -> DefenseConfig:
        """`cpu`, but the baseline and the dedup/RMFT runs are FULL fine-tunes (6 epochs, lr 1e-4): the
        LoRA baseline memorizes no PII beyond guessable e-mails, this one does
        (experiments/results/pii_memorization_full_ft.json). DP-SGD stays on LoRA adapters: per-sample
        gradients of all 135M parameters are out of reach of 2 CPU cores (the row says so)."""
        return replace(cls.cpu(), epochs=6, lr=1e-4, lora=False)

    @classmethod
    def quick(cls) -> DefenseConfig:
        return cls(model="tiny-llama", lab_preset="tiny", epochs=30, lr=1e-2, batch_size=8, seq_len=512,
                   lora=False, dp_lr=5e-2, dp_epsilons=(8.0,), sparsities=(0.3,), ablate_fractions=(0.02,),
                   edit_strengths=(1.0,), evaluation=EvalConfig(extraction_samples=1, exposure_samples=100,
                                                                n_boot=50, max_tokens=128, sample_prompts=1,
                                                                batch_size=32))


def _cached(path: Path, compute: Any) -> Any:
    from memprobe.results import write_json

    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    write_json(path, value)
    return value


def lab_hash(lab_dir: Path) -> str:
    """sha256 of the lab's member and non-member files: a changed lab is a new evaluation."""
    from memprobe.models import file_sha256

    return ":".join(file_sha256(lab_dir / f) for f in ("members.jsonl", "nonmembers.jsonl"))


def check_config(cfg: DefenseConfig) -> None:
    """Refuse a knob outside its range before anything is trained."""
    from memprobe.defend.posthoc import check_knob

    checks = [("rmft_fractions", cfg.rmft_fractions, lambda v: 0 < v <= 1, "(0, 1]"),
              ("dp_epsilons", cfg.dp_epsilons, lambda v: 0 < v <= 100, "(0, 100]"),
              ("sparsities", cfg.sparsities, lambda v: 0 <= v < 1, "[0, 1)")]
    for name, values, ok, interval in checks:
        bad = [v for v in values if not ok(v)]
        if bad or not values:
            raise MemprobeError(f"{name}={values}: every value must lie in {interval}")
    for v in cfg.ablate_fractions:
        check_knob("ablate", v)
    for v in cfg.edit_strengths:
        check_knob("edit", v)


@dataclass
class _Context:
    """What every defense of one study shares: the config, base name, members, the undefended
    fine-tune, the splits, its step count and where models go."""

    cfg: DefenseConfig
    members: list[dict]
    splits: dict[str, dict[str, list]]
    finetuned: Any  # LoadedModel of the undefended fine-tune
    steps: int
    models: Path
    notes: dict[str, Any]
    progress: bool = False
    artifacts: Path | None = None  # where the small artifacts go: edits, DP LoRA adapters
    _edit: Any = None

    def train_args(self) -> dict[str, Any]:
        c = self.cfg
        return dict(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, seq_len=c.seq_len, lora=c.lora,
                    seed=c.seed, progress=self.progress)


def defended_model(ctx: _Context, method: str, knob: Any) -> tuple[Any, list[str]]:
    """(LoadedModel of `method` at `knob`, ids of the documents it trained on)."""
    from memprobe.defend.dedup import deduplicate
    from memprobe.defend.dp import dp_finetune
    from memprobe.defend.posthoc import build_posthoc, edit_at_knob
    from memprobe.defend.prune import prune_mlp
    from memprobe.defend.rmft import rmft
    from memprobe.intervene.ablation import save_edit
    from memprobe.intervene.export import patched_model
    from memprobe.lab.finetune import finetune
    from memprobe.models import load_model

    cfg, ft, all_ids, name = ctx.cfg, ctx.finetuned, [d["id"] for d in ctx.members], f"{method}-{knob}"
    if method == "dedup":
        docs, ctx.notes[name] = deduplicate(ctx.members)
        finetune(cfg.model, docs, ctx.models / name, **ctx.train_args(), steps=ctx.steps)
        return load_model(str(ctx.models / name)), [d["id"] for d in docs]
    if method == "rmft":
        docs, ctx.notes[name] = rmft(ctx.members, fraction=knob, seed=cfg.seed)
        finetune(cfg.model, docs, ctx.models / name, **ctx.train_args(), steps=ctx.steps)
        return load_model(str(ctx.models / name)), all_ids
    if method == "dp":
        prov = dp_finetune(cfg.model, ctx.members, ctx.models / name, epsilon=knob, epochs=cfg.epochs,
                           lr=cfg.dp_lr, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
        ctx.notes[name] = {"privacy": prov["privacy"], "steps": prov["steps"]}
        if ctx.artifacts is not None:
            _keep_adapter(ctx.models / name, ctx.artifacts / name)
        return load_model(str(ctx.models / name / "model")), all_ids
    if method.startswith("prune-"):
        kind = method.removeprefix("prune-")
        pruned = copy.deepcopy(ft.model)
        calibration = [ft.encode(d["text"])[: cfg.seq_len] for d in ctx.splits["build"]["nonmembers"]]
        ctx.notes[name] = prune_mlp(pruned, knob, method=kind, calibration=calibration)
        return _derived(ft, name, pruned), all_ids
    if method in ("ablate", "edit"):
        build = (ctx.splits["build"]["members"], ctx.splits["build"]["nonmembers"])
        if method == "edit" and ctx._edit is None:
            ctx._edit = build_posthoc(ft, method, *build, seed=cfg.seed, edit_steps=cfg.edit_steps,
                                      edit_lr=cfg.edit_lr)
        edit = edit_at_knob(ft, method, ctx._edit, knob, *build, seed=cfg.seed)
        if ctx.artifacts is not None:
            save_edit(edit, ctx.artifacts / f"{name}.safetensors")
        return _derived(ft, name, patched_model(ft.model, edit)), all_ids
    raise MemprobeError(f"unknown defense method {method!r}: choose from {', '.join(ALL_METHODS)}")


def _derived(ft: Any, name: str, model: Any) -> Any:
    """A post-hoc defense of `ft` as a LoadedModel with no file sha256 (it has no file): the
    evaluation is then keyed by its weights, so an edit or pruning that changed is measured again."""
    from memprobe.models import LoadedModel

    return LoadedModel(f"{ft.name}+{name}", model, ft.tokenizer,
                       {**ft.info, "sha256": None, "derived_from_sha256": ft.info.get("sha256")})


def _keep_adapter(run_dir: Path, target: Path) -> None:
    """Copy a DP run's LoRA adapter and its provenance (a few MB, unlike the merged model) to
    `target`, published whole or not at all."""
    import shutil

    from memprobe.io import staged_directory
    from memprobe.lab.finetune import PROVENANCE_FILE

    with staged_directory(target, replace=True) as tmp:
        shutil.copytree(run_dir / "model" / "adapter", tmp / "adapter")
        shutil.copy2(run_dir / PROVENANCE_FILE, tmp / PROVENANCE_FILE)


def _cost_row(method: str, cost: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """A defense's cost: post-hoc builds as measured here, fine-tunes from their provenance."""
    row = {"build_seconds": cost["seconds"], "build_peak_rss_mb": cost["peak_rss_mb"]}
    prov_file = next((f for f in (model_dir / "memprobe-finetune.json", model_dir / "model" / "memprobe-finetune.json")
                      if f.exists()), None) if method in ("dedup", "rmft", "dp") else None
    if prov_file is not None:
        prov = json.loads(prov_file.read_text(encoding="utf-8"))
        row |= {"train_seconds": prov.get("train_seconds"), "peak_rss_mb": prov.get("peak_rss_mb")}
    return row


def knobs_of(cfg: DefenseConfig, method: str) -> tuple[Any, ...]:
    """The settings the study tries for `method`."""
    return {"dedup": ("exact+near",), "rmft": cfg.rmft_fractions, "dp": cfg.dp_epsilons,
            "prune-magnitude": cfg.sparsities, "prune-wanda": cfg.sparsities,
            "ablate": cfg.ablate_fractions, "edit": cfg.edit_strengths}[method]


def run_defenses(cfg: DefenseConfig, out_dir: str | Path, *, progress: bool = False,
                 lab: str | Path | None = None, finetuned: str | Path | None = None,
                 artifacts: str | Path | None = None) -> DefenseStudy:
    """Run (or resume) the whole study; returns the result (also saved as `defenses.json`).

    `lab` and `finetuned` reuse an existing lab directory and undefended fine-tune (whose
    `memprobe-finetune.json` gives the step count); otherwise both are made under `out_dir`.
    `artifacts`: a directory for what is small enough to commit: each post-hoc edit
    (`<method>-<knob>.safetensors`, `memprobe.intervene.ablation.load_edit`) and each DP-SGD
    LoRA adapter with its provenance (`dp-<eps>/`); full model copies stay under `out_dir`."""
    from memprobe.lab.corpus import build_lab, load_lab
    from memprobe.lab.finetune import PROVENANCE_FILE, finetune, weights_sha256
    from memprobe.models import load_model

    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise MemprobeError(f"unknown defense methods {unknown}: choose from {', '.join(ALL_METHODS)}")
    check_config(cfg)
    out = Path(out_dir)
    lab_dir = Path(lab) if lab is not None else out / "lab"
    if lab is None and not (lab_dir / "manifest.json").exists():
        build_lab(lab_dir, preset=cfg.lab_preset, seed=cfg.lab_seed)
    members, nonmembers, _ = load_lab(lab_dir)
    splits = split_lab(members, nonmembers, seed=cfg.seed)
    base = load_model(cfg.model)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    if finetuned is None:
        finetuned = models / "baseline"
        finetune(cfg.model, members, finetuned, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                 seq_len=cfg.seq_len, lora=cfg.lora, seed=cfg.seed, progress=progress)
    prov_file = Path(finetuned) / PROVENANCE_FILE
    if not prov_file.exists():
        raise MemprobeError(f"{finetuned} has no {PROVENANCE_FILE}: give a model trained by `memprobe finetune` "
                            "(its steps and hyperparameters are what the defenses must match)")
    baseline_prov = json.loads(prov_file.read_text(encoding="utf-8"))
    hp = baseline_prov.get("hyperparameters", {})
    cfg = replace(cfg, **{k: hp[k] for k in ("epochs", "lr", "batch_size", "seq_len", "lora", "seed") if k in hp})
    ft = load_model(str(finetuned))
    check_pair(base, ft)
    # measurements are keyed by what decides them: evaluation settings, base, the fine-tune's weights
    # (not its path: a retrained model at the same path is a new evaluation), lab, seed
    key = json.dumps([asdict(cfg.evaluation), cfg.model, baseline_prov.get("base_model", {}).get("weights_sha256"),
                      ft.info.get("sha256"), lab_hash(lab_dir), cfg.seed], sort_keys=True)
    eval_dir = out / "eval" / hashlib.sha256(key.encode()).hexdigest()[:12]
    hard = _cached(eval_dir / "hard_texts.json",
                   lambda: hard_texts(base, seed=cfg.seed, sample_prompts=cfg.evaluation.sample_prompts))
    notes: dict[str, Any] = {"steps": baseline_prov["steps"]["total"],
                             "equalised": "dedup and RMFT: the baseline's optimizer steps and batch size "
                             "(finetune(steps=...)); DP-SGD: the same epochs over one record per document "
                             "presentation (expected batches of batch_size)"}
    if "dp" in cfg.methods and not cfg.lora:
        notes["dp_caveat"] = ("DP-SGD trains LoRA adapters (memprobe.defend.dp) while the baseline is a full "
                              "fine-tune: fewer trainable parameters, so part of any privacy gain is LoRA's")
    ctx = _Context(cfg, members, splits, ft, baseline_prov["steps"]["total"], models, notes, progress,
                   Path(artifacts) if artifacts is not None else None)

    references: dict[str, dict[str, float]] = {}  # the base model's ref-attack losses, read once per split

    def reference(split: str) -> dict[str, float]:
        if split not in references:
            references[split] = reference_losses(base, splits[split]["members"], splits[split]["nonmembers"],
                                                 cfg.evaluation)
        return references[split]

    def evaluate(name: str, loaded: Any, seen: list[str]) -> dict[str, Any]:
        check_pair(base, loaded)
        # keyed by the weights: a retrained or rebuilt defense is a new measurement
        weights = (loaded.info.get("sha256") or weights_sha256(loaded.model))[:12]
        return {split: _cached(eval_dir / f"{name}-{weights}-{split}.json",
                               lambda split=split: measure(loaded, base, splits[split]["members"],
                                                           splits[split]["nonmembers"], hard, cfg.evaluation,
                                                           seen_ids=seen, reference_loss=reference(split)))
                for split in ("validation", "test")}

    baseline = evaluate("baseline", ft, [d["id"] for d in members])
    costs: dict[str, Any] = {"baseline": {"train_seconds": baseline_prov.get("train_seconds"),
                                          "peak_rss_mb": baseline_prov.get("peak_rss_mb")}}
    methods: dict[str, dict[Any, dict[str, Any]]] = {}
    for method in cfg.methods:
        methods[method] = {}
        for knob in knobs_of(cfg, method):
            with stage_cost() as cost:
                loaded, seen = defended_model(ctx, method, knob)
            costs[f"{method}-{knob}"] = _cost_row(method, cost, models / f"{method}-{knob}")
            methods[method][knob] = evaluate(f"{method}-{knob}", loaded, seen)
    notes["costs"] = costs
    notes["costs_note"] = ("train_seconds / peak_rss_mb of a fine-tune: its own provenance (the run that "
                           "trained it; peak RSS only where that run recorded it); build_seconds / "
                           "build_peak_rss_mb: this invocation's build of a post-hoc defense (for a cached "
                           "fine-tune: its loading)")
    notes["config"] = json.loads(json.dumps(asdict(cfg)))
    notes["evaluation_cache"] = str(eval_dir)
    notes["splits"] = {s: {k: len(v) for k, v in parts.items()} for s, parts in splits.items()}
    study = DefenseStudy(cfg.evaluation, baseline, methods, notes)
    study.save(out / "defenses.json")
    return study
