"""General memorization suppression on smollm2-135m: one edit, its strength chosen on validation
texts, its effect reported on test texts, every control kind counted.

Splits by `split_group` (so a text never has a passage of its own source in another split): a third
of the memorized groups build the edit (at most --max-docs texts: the training budget), the rest are
dealt into VALIDATION and TEST (memprobe.studies.suppression.split_validation_test, controls
stratified by kind). Controls are ALL the bundled corpus's made-up texts: novel prose, PII,
formulaic text, code idioms, perturbed famous texts, repetitions and the model's own samples,
reported together, as the easy subset (base memorized fraction <= 0.25, the old filter) and per
kind. The learned low-rank edit's strength is chosen on validation (largest suppression at <= +5%
perplexity on validation ALL controls) and reported on test with document-bootstrap 95% intervals,
beside a random edit of the same layers, rank and norm. The neuron and direction edits are
comparisons measured on the same test texts (point estimates, nothing chosen from them; skipped with
--no-comparisons). The chosen edit is saved, exported as a HF directory and re-measured through plain
transformers.

    .venv/bin/python experiments/suppress.py            # full (smollm2-135m)
    .venv/bin/python experiments/suppress.py --no-comparisons   # the learned edit only
    .venv/bin/python experiments/suppress.py --quick    # tiny trained LM, < 2 min
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memprobe.corpora import bundled_corpus
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import load_edit, save_edit
from memprobe.intervene.export import export_patched
from memprobe.intervene.localizers import RandomScores, mean_activations, top_neurons
from memprobe.intervene.suppress import (
    contrast_scores,
    guarded_top_neurons,
    make_edit,
    split_memorized,
    targets_from_labels,
)
from memprobe.intervene.weight_edit import random_low_rank_like
from memprobe.models import load_model
from memprobe.plots import save_figure
from memprobe.results import experiment_parser, save_results
from memprobe.studies.cache import StepCache
from memprobe.studies.suppression import (
    LOSS,
    MEM,
    TOKENS,
    SuppressionConfig,
    document_rows,
    evaluate_suppression,
    label_records,
    measure_split,
    run_suppression,
    split_validation_test,
    suppression_documents,
)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache" / "intervene"
DIRECTION_STRENGTHS = (0.1, 0.25, 1.0)
LOW_RANK_STRENGTHS = (0.25, 0.5, 1.0, 1.5)
PPL_BUDGET = 0.05


SAMPLE_PROMPTS = 4  # model-sample controls from the first 4 prompts (2 samples each): sampling is slow


def _quick_setup(seed: int):
    from memprobe.train.tiny_lm import train_tiny_lm

    corpus = bundled_corpus(None, seed=seed, include_model_samples=False)
    famous = [d for d in corpus if d["kind"] == "shakespeare"][:9]
    controls = []
    for kind in ("novel", "code", "formulaic"):
        controls += [d for d in corpus if d["kind"] == kind][:3]
    docs = [{**d, "role": "candidate", "text": d["text"][:200]} for d in famous]
    docs += [{**d, "role": "control", "text": d["text"][:200]} for d in controls]
    loaded = train_tiny_lm([d["text"] for d in docs[: len(famous)]], steps=600, seq_len=64, batch=8, lr=1e-2,
                           seed=seed)
    return loaded, docs, 300


def _full_setup(seed: int):
    loaded = load_model("smollm2-135m")
    return loaded, suppression_documents(seed, loaded=loaded, sample_prompts=SAMPLE_PROMPTS), 64


def main(argv: list[str] | None = None) -> int:
    ap = experiment_parser(__doc__, ROOT)
    ap.add_argument("--max-docs", type=int, default=8, help="memorized texts the edits are built from (CPU budget)")
    ap.add_argument("--no-comparisons", action="store_true", help="the learned edit only (no neuron/direction edits)")
    ap.add_argument("--n-boot", type=int, default=1000, help="document-bootstrap resamples per interval")
    ap.add_argument("--edit", type=Path, help="measure this saved low-rank edit instead of training one "
                    "(its build texts are reproduced from --edit-results and excluded by split_group)")
    ap.add_argument("--edit-results", type=Path, default=ROOT / "experiments" / "results" / "suppress.json",
                    help="the results file of the run that built --edit (its build_ids are checked)")
    args = ap.parse_args(argv)
    if args.edit is not None and args.quick:
        raise SystemExit("--edit measures a saved smollm2 edit: not with --quick")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a shared 2-core CPU: more threads only spin
    t0 = time.time()
    loaded, docs, max_tokens = _quick_setup(args.seed) if args.quick else _full_setup(args.seed)
    tag = "quick" if args.quick else "smollm2"
    cache = None if args.quick else StepCache(CACHE / tag)
    records = label_records(loaded, docs, max_tokens, cache)
    # Every control kind counts (control_max=1.0): it trains (build) and judges (held out) the edit.
    parts = split_memorized(records, seed=args.seed, threshold=0.3, control_max=1.0, build_share=1 / 3)
    rng = np.random.default_rng(args.seed)
    for name, cap in (("build_memorized", args.max_docs), ("build_control", 2 * args.max_docs)):
        if len(parts[name]) > cap:  # building is the expensive part; held-out texts are only measured
            keep = sorted(rng.choice(len(parts[name]), cap, replace=False))
            parts[name] = [parts[name][i] for i in keep]
    config = SuppressionConfig(seed=args.seed, max_tokens=max_tokens, strengths=LOW_RANK_STRENGTHS,
                               ppl_budget=PPL_BUDGET, n_boot=args.n_boot)
    if args.edit is not None:  # measure a saved edit: every text outside its build groups is held out
        parts = _saved_edit_parts(records, args.edit_results, args.seed)
        edit = load_edit(args.edit).with_strength(1.0)
        study = evaluate_suppression(loaded.model, edit, random_low_rank_like(edit, seed=args.seed),
                                     parts["heldout_memorized"], parts["heldout_control"], config,
                                     build_sizes={k: len(parts[k]) for k in ("build_memorized", "build_control")})
        args.no_comparisons = True
    else:
        # A learned low-rank edit of MLP output weights (memprobe.studies.suppression, as the audit runs
        # it); its random baseline has the same layers, rank and per-layer norm.
        study = run_suppression(loaded.model, parts["build_memorized"], parts["build_control"],
                                parts["heldout_memorized"], parts["heldout_control"], config)
        study.edit.meta["build_seconds"] = study.build_seconds
    test = {name: split_validation_test(parts[f"heldout_{name}"], config.validation_share, config.seed)[1]
            for name in ("memorized", "control")}
    comparisons, probe_status = None, "not tried"
    if not args.no_comparisons:
        comparisons, probe_status = _comparisons(loaded, parts, test, study, config, args, cache)
    chosen = study.chosen
    edit_file = args.out / f"suppress_edit_{tag}.safetensors"
    save_edit(study.chosen_edit, edit_file)
    shipped = {"edit_file": str(edit_file.relative_to(ROOT) if edit_file.is_relative_to(ROOT) else edit_file),
               "strength": chosen["strength"], "chosen_on": "validation", "reported_on": "test",
               "floor_met": bool(chosen["within_budget"] and chosen["suppression"] >= 0.5)}
    if not args.quick:
        shipped["exported_check"] = _check_export(loaded, study.chosen_edit, test, max_tokens, chosen)
    results = {"model": loaded.info, "study": study.to_dict(), "shipped_edit": shipped,
               "edit_source": "trained in this run" if args.edit is None else
               f"{args.edit} (built by the earlier run of {args.edit_results.name}, measured here)",
               "comparisons": comparisons,
               "comparisons_note": "neuron and direction edits measured on the same test texts (all controls); "
                                   "point estimates, nothing chosen from them",
               "ppl_budget": PPL_BUDGET, "max_tokens": max_tokens,
               "control_kinds": dict(sorted(Counter(str(r["kind"]) for r in records if r["role"] == "control").items())),
               "build_ids": [r["id"] for r in parts["build_memorized"]],
               "build_control_ids": [r["id"] for r in parts["build_control"]],
               "contrast_method": "attribution (activation x gradient) on memorized tokens minus on control tokens",
               "probe_direction": probe_status, "wall_seconds": time.time() - t0}
    suffix = "_quick" if args.quick else ""
    save_results(args.out / f"suppress{suffix}.json", results, seed=args.seed)
    study.plot(args.figures / f"intervene_suppress_learned{suffix}.png", script="experiments/suppress.py",
               title=f"{loaded.name}: learned edit, test split")
    if comparisons is not None:
        _figure(comparisons, study, args.figures / f"intervene_suppress_pareto{suffix}.png", loaded.name)
    keys = ("suppression", "suppression_ci95", "ppl_change", "ppl_change_ci95", "top1_change", "top1_change_ci95")
    print(json.dumps({"split_sizes": study.split_sizes, "strength": chosen["strength"],
                      "within_budget": chosen["within_budget"], **{k: chosen[k] for k in keys},
                      "random": {k: chosen["random_baseline"][k] for k in keys},
                      "easy_ppl_change": chosen["controls"]["easy"] and chosen["controls"]["easy"]["ppl_change"],
                      "by_kind_ppl_change": {k: v and [v["documents"], v["ppl_change"], v.get("ppl_change_ci95")]
                                             for k, v in chosen["controls"]["by_kind"].items()}}, indent=1))
    return 0


def _saved_edit_parts(records: list[dict], results_path: Path, seed: int) -> dict[str, list[dict]]:
    """The build texts of the earlier protocol (easy controls only, 8 texts per part), reproduced from
    the same labels and checked against its results file; every other text is held out, except any
    in a build text's `split_group`."""
    old = json.loads(results_path.read_text())["results"]
    if "build_ids" not in old:
        raise MemprobeError(f"{results_path} records no build_ids: it is not the run that built the edit")
    old_records = [r for r in records if r["role"] == "candidate" or r["kind"] in ("novel", "pii", "formulaic", "code")]
    parts = split_memorized(old_records, seed=seed, threshold=0.3, control_max=0.25)
    rng = np.random.default_rng(seed)
    for name in parts:
        if len(parts[name]) > 8:
            keep = sorted(rng.choice(len(parts[name]), 8, replace=False))
            parts[name] = [parts[name][i] for i in keep]
    if [r["id"] for r in parts["build_memorized"]] != old["build_ids"]:
        raise MemprobeError(f"the build texts of {results_path} could not be reproduced from these labels")
    build = {str(r["split_group"]) for k in ("build_memorized", "build_control") for r in parts[k]}
    held = [r for r in records if str(r["split_group"]) not in build]
    return {"build_memorized": parts["build_memorized"], "build_control": parts["build_control"],
            "heldout_memorized": [r for r in held if r["role"] == "candidate" and (r["memorized_fraction"] or 0) >= 0.3],
            "heldout_control": [r for r in held if r["role"] == "control"]}


def _comparisons(loaded, parts, test, study, config, args, cache) -> tuple[dict, str]:
    """Neuron and direction edits built from the same build texts, measured on the same test texts."""
    ids = {k: [r["token_ids"][: config.max_tokens] for r in v] for k, v in parts.items()}
    mem_targets = targets_from_labels(ids["build_memorized"], [r["memorized"][: config.max_tokens]
                                                               for r in parts["build_memorized"]])
    ctrl_targets = targets_from_labels(ids["build_control"])
    test_ids = [r["token_ids"][: config.max_tokens] for r in test["memorized"] + test["control"]]
    n_mem = len(test["memorized"])
    kinds = [str(r.get("kind")) for r in test["control"]]
    easy = np.array([(r.get("memorized_fraction") or 0.0) <= config.easy_control_max for r in test["control"]])

    def rows(edit) -> dict[str, np.ndarray]:
        table = document_rows(loaded.model, test_ids, edit)
        return {"memorized": table[:n_mem], "control": table[n_mem:]}

    base = rows(None)

    def measure(edit) -> dict:
        m = measure_split(base, rows(edit), kinds, easy, n_boot=0, seed=config.seed)
        return {"size": edit.size, "suppression": m["suppression"], "memorized_token_rate": m["memorized_token_rate"],
                "ppl_change": m["ppl_change"], "top1_change": m["top1_change"],
                "ppl_change_easy": m["controls"]["easy"]["ppl_change"] if m["controls"]["easy"] else None,
                "ppl_change_by_kind": {k: v["ppl_change"] for k, v in m["controls"]["by_kind"].items() if v}}

    def score(path: Path) -> None:
        means = mean_activations(loaded.model, ctrl_targets)
        save_file({"scores": contrast_scores(loaded.model, mem_targets, ctrl_targets, means), "means": means},
                  str(path))

    build_key = {"inputs": {"model": {k: loaded.info.get(k) for k in ("name", "sha256", "seed")},
                            "labels": [(r["id"], r["token_ids"], r["memorized"]) for k in ("build_memorized", "build_control")
                                       for r in parts[k]]},
                 "code": [score, mean_activations, contrast_scores]}
    scratch = cache or StepCache(tempfile.mkdtemp(prefix="suppress-quick-"))
    scratch.run("contrast scores", ["contrast_scores_mean.safetensors"], score, **build_key)
    stored = load_file(str(scratch.root / "contrast_scores_mean.safetensors"))
    scores, means = stored["scores"], stored["means"]

    def random_neurons(frac: float):
        return top_neurons(RandomScores(loaded.model, args.seed).localize().scores, frac, means=means,
                           meta={"method": "random-neurons", "fraction": frac, "seed": args.seed})

    curves: dict[str, list[dict]] = {"contrast-neurons": [], "random-neurons": [], "guarded-contrast-neurons": [],
                                     "mean-diff-direction": [], "random-direction": []}
    grid = ((0.0001, 1.0), (0.00025, 0.5), (0.00025, 1.0), (0.00035, 1.0), (0.0005, 1.0)) if not args.quick else \
        ((0.01, 1.0), (0.05, 0.5), (0.05, 1.0))
    for frac, strength in grid:
        edit = top_neurons(scores, frac, means=means, strength=strength,
                           meta={"method": "contrast-neurons", "fraction": frac, "seed": args.seed, "ablation": "mean"})
        curves["contrast-neurons"].append({"fraction": frac, "strength": strength, **measure(edit)})
        if strength == 1.0:
            curves["random-neurons"].append({"fraction": frac, "strength": 1.0, **measure(random_neurons(frac))})
    # Guarded: the same ranking, skipping neurons whose mean ablation alone costs > 0.01 nats on the
    # build controls (never the held-out ones).
    ks, max_k = ((12, 24), 24) if not args.quick else ((2, 4), 4)

    def guarded() -> dict:
        g = guarded_top_neurons(loaded.model, scores, means, ctrl_targets, max_k, max_candidates=max_k + 12)
        return {"kept": g.meta["kept_neurons"], "skipped": g.meta["skipped_neurons"]}

    guard = scratch.json("guarded neurons", guarded, settings={"max_k": max_k}, inputs=build_key["inputs"],
                         code=[guarded, guarded_top_neurons])
    for k in ks:
        if k > len(guard["kept"]):
            break
        chosen = torch.zeros(scores.numel())
        chosen[guard["kept"][:k]] = 1.0
        edit = top_neurons(chosen.view_as(scores), k=k, means=means,
                           meta={"method": "guarded-contrast-neurons", "fraction": k / scores.numel(),
                                 "seed": args.seed, "ablation": "mean", "skipped_neurons": guard["skipped"]})
        curves["guarded-contrast-neurons"].append({"k": k, **measure(edit)})
    direction = make_edit(loaded.model, "mean-diff-direction", mem_targets, ctrl_targets, seed=args.seed)
    for s in DIRECTION_STRENGTHS:
        curves["mean-diff-direction"].append({"strength": s, **measure(direction.with_strength(s))})
        rnd = make_edit(loaded.model, "random-direction", [], [], strength=s, seed=args.seed)
        curves["random-direction"].append({"strength": s, **measure(rnd)})
    probe_status = "not tried in quick mode"
    if not args.quick:  # the issue-3 probe's direction, when its artefact exists for this model
        try:
            probe = make_edit(loaded.model, "probe-direction", [], [], loaded=loaded, seed=args.seed)
            curves["probe-direction"] = [{"strength": s, **measure(probe.with_strength(s))} for s in DIRECTION_STRENGTHS]
            probe_status = "used"
        except MemprobeError as exc:
            probe_status = f"unavailable: {exc}"
    keep = ("suppression", "memorized_token_rate", "ppl_change", "top1_change")
    for name, rows_ in (("low-rank-edit", study.test["curve"]), ("random-low-rank", study.test["random_curve"])):
        curves[name] = [{"strength": r["strength"], "size": study.edit.size, **{k: r[k] for k in keep},
                         "ppl_change_easy": r["controls"]["easy"] and r["controls"]["easy"]["ppl_change"]}
                        for r in rows_]
    return curves, probe_status


def _check_export(loaded, edit, test, max_tokens: int, chosen: dict) -> dict:
    """Export the edit, reload it with plain transformers, and re-measure the test numbers."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = CACHE / "patched_smollm2"
    if out.exists():
        shutil.rmtree(out)
    export_patched(loaded, edit, out)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mem = document_rows(plain, [r["token_ids"][:max_tokens] for r in test["memorized"]])
    ctrl = document_rows(plain, [r["token_ids"][:max_tokens] for r in test["control"]])
    return {"dir": str(out.relative_to(ROOT)),
            "memorized_token_rate": float(mem[:, MEM].sum() / mem[:, TOKENS].sum()),
            "perplexity": math.exp(ctrl[:, LOSS].sum() / ctrl[:, TOKENS].sum()),
            "hooked_memorized_token_rate": chosen["memorized_token_rate"], "hooked_perplexity": chosen["perplexity"]}


def _figure(curves: dict, study, path: Path, model_name: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    styles = {"contrast-neurons": "o-", "random-neurons": "o--", "mean-diff-direction": "s-", "random-direction": "s--",
              "probe-direction": "^-", "guarded-contrast-neurons": "D-", "low-rank-edit": "P-",
              "random-low-rank": "P--"}
    for name, curve in curves.items():
        curve = sorted(curve, key=lambda p: p["ppl_change"])
        xs = [100 * p["ppl_change"] for p in curve]
        ys = [100 * p["suppression"] for p in curve]
        axes[0].plot(xs, ys, styles[name], label=name)
        axes[1].plot([-100 * p["top1_change"] for p in curve], ys, styles[name], label=name)
    for ax in axes:
        ax.axhline(50, c="0.6", ls=":", lw=0.8)
        ax.set_ylabel("memorized-token rate drop, test texts (%)")
        ax.set_xscale("symlog", linthresh=1)
    axes[0].axvline(100 * PPL_BUDGET, c="0.6", ls=":", lw=0.8)
    axes[0].set_xlabel("perplexity change on ALL test controls (%)")
    axes[1].set_xlabel("top-1 accuracy drop on ALL test controls (points)")
    axes[0].legend(fontsize=7)
    base = study.test["base"]
    fig.suptitle(f"{model_name}: suppression vs cost, test split (base mem rate "
                 f"{base['base_memorized_token_rate']:.3f}, ppl {base['controls']['all']['base_perplexity']:.2f})")
    save_figure(fig, path, script="experiments/suppress.py")


if __name__ == "__main__":
    raise SystemExit(main())
