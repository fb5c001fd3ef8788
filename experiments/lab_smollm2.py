"""The membership lab on smollm2-135m: fine-tune on the `small` lab's members, then measure what the
attacks, canary exposure, PII extraction and the dataset-level test see, with the base model beside
every number (a value the base model already "extracts" is guessable, not memorized).

Stages (each a content-keyed step under --run-dir, so a re-run resumes from what finished; the
results file is rewritten after every stage and lists which stages are done):
 1. build the lab (seed 0) and fully fine-tune on its members (copies respected), checkpoints early;
 2. MIA scores of every member and non-member (target = final model, reference = base model);
 3. per attack: ROC-AUC, TPR@1%FPR (0.1% only with >= 1000 non-members), document-bootstrap 95%
    intervals, overall, per copies and per kind; linear and log-log ROC figures;
 4. dataset-level test: the attack is chosen on one half of the documents, power (n = 10..200, capped
    by the other half's pools) and the false-positive rate are measured on the other half;
 5. exposure of every member and non-member canary, on the final and the base model;
 6. k-extractability / 32-32 of member passages, final and base;
 7. PII extraction (greedy + 8 samples): TER/SER per type and recurrence, final, base and an early
    checkpoint (SER with its seen ids).

    .venv/bin/python experiments/lab_smollm2.py                        # smollm2-135m, `small` lab
    .venv/bin/python experiments/lab_smollm2.py --quick --run-dir /tmp/q --out /tmp/q --figures /tmp/q
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from memprobe.lab import build_lab, load_lab
from memprobe.lab.finetune import finetune
from memprobe.metrics import roc_auc, roc_curve
from memprobe.mia import attacks, evaluate, extraction
from memprobe.mia.dataset_test import false_positive_rate, power
from memprobe.models import file_sha256, load_model
from memprobe.results import experiment_parser, save_results, write_json
from memprobe.studies.cache import StepCache

ROOT = Path(__file__).resolve().parents[1]
# the module, not the function memprobe.mia re-exports under the same name
exposure = importlib.import_module("memprobe.mia.exposure")

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "model": "smollm2-135m", "preset": "small", "name": "lab_smollm2",
        # one epoch: what a shared 2-core CPU allows (~58 steps of 8 windows of <= 256 tokens)
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 8, "seq_len": 256, "save_steps": [8, 16, 32],
                     "state_every": 10, "warmup_steps": 4},
        "score": {"k": 0.2, "batch_size": 8, "chunk": 32},
        "n_boot": 1000,
        "dataset_test": {"sizes": [10, 20, 50, 100, 200], "n_resamples": 500, "n_resamples_permutation": 200},
        # skew-normal fit first; the exact (pruned) digit-tree walk where that puts the rank this low
        "exposure": {"n_samples": 500, "exact_if_rank_below": 1000},
        "passages": {"batch_size": 8},
        # PII: all mails of this many people per recurrence count, plus this many non-member mails
        "extraction": {"people_per_recurrence": {"1": 20, "2": 10, "4": 5, "8": 3}, "nonmember_mails": 20,
                       "chunk": 4, "batch_size": 8, "checkpoint": 32},
        "baseline_every": 3,
    },
    "quick": {
        "model": "tiny-llama", "preset": "tiny", "name": "lab_smollm2_quick",
        "finetune": {"epochs": 30, "lr": 5e-3, "batch_size": 8, "seq_len": 256, "save_steps": [8],
                     "state_every": 100, "warmup_steps": 0},
        "score": {"k": 0.2, "batch_size": 8, "chunk": 16},
        "n_boot": 200,
        "dataset_test": {"sizes": [4, 9], "n_resamples": 200, "n_resamples_permutation": 200},
        "exposure": {"n_samples": 200, "exact_if_rank_below": 1000},
        "passages": {"batch_size": 8},
        "extraction": {"people_per_recurrence": {"1": 1, "2": 1}, "nonmember_mails": 1,
                       "chunk": 4, "batch_size": 8, "checkpoint": 8},
        "baseline_every": 1,
    },
}


def cached(steps: StepCache, name: str, compute: Callable[[], Any], *, inputs: dict, settings: Any,
           code: list) -> Any:
    """`compute()`'s JSON value, computed once per content key and read back on a re-run."""
    out = f"{name}.json"
    steps.run(name, [out], lambda path: write_json(path, {"value": compute()}), inputs=inputs,
              settings=settings, code=code)
    return json.loads((steps.root / out).read_text(encoding="utf-8"))["value"]


def chunks(docs: list[dict], size: int) -> list[list[dict]]:
    return [docs[i : i + size] for i in range(0, len(docs), size)]


def doc_key(docs: list[dict]) -> list[list[str]]:
    return [[d["id"], d["text"]] for d in docs]


def evaluate_groups(records: list[dict], docs: list[dict], n_boot: int, seed: int) -> dict[str, Any]:
    """evaluate_mia overall (per copies against all non-members) and within each kind (members of the
    kind against non-members of the same kind, per copies): copies > 1 exist only for canaries, and a
    canary against e-mail non-members would measure the kind, not membership."""
    member = {d["id"]: d["member"] for d in docs}
    copies = {d["id"]: d["copies"] for d in docs}
    out = {"overall": evaluate.evaluate_mia(records, member, copies=copies, n_boot=n_boot, seed=seed)}
    kind_of = {d["id"]: d["kind"] for d in docs}
    for kind in sorted(set(kind_of.values())):
        subset = [r for r in records if kind_of[r["id"]] == kind]
        out[kind] = evaluate.evaluate_mia(subset, member, copies=copies, n_boot=n_boot, seed=seed)
    return out


def roc_figures(records: list[dict], docs: list[dict], title: str, linear: Path, loglog: Path) -> None:
    from memprobe.plots import plt, save_figure

    member = {d["id"]: d["member"] for d in docs}
    labels = np.array([member[r["id"]] for r in records])
    for path, log in ((linear, False), (loglog, True)):
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
        for attack in attacks.ATTACKS:
            scores = np.array([r["scores"][attack] for r in records])
            fpr, tpr, _ = roc_curve(scores, labels)
            ax.plot(fpr, tpr, label=f"{attack} (AUC {roc_auc(scores, labels):.3f})")
        ax.plot([1e-3, 1], [1e-3, 1], ls="--", c="0.6", lw=0.8)
        if log:
            lowest = 1 / max(1, int((~labels).sum()))
            ax.set(xscale="log", yscale="log", xlim=(lowest / 2, 1), ylim=(1e-3, 1.02))
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"{title} ({'log-log' if log else 'linear'})")
        ax.legend(fontsize=7, loc="lower right")
        save_figure(fig, path)


def dataset_level(records: list[dict], docs: list[dict], cfg: dict, seed: int) -> dict[str, Any]:
    """Choose the attack on one half of the documents (by AUC), test with it on the other half."""
    rng = np.random.default_rng(seed)
    member = {d["id"]: d["member"] for d in docs}
    select: set[str] = set()
    for flag in (True, False):
        ids = sorted(i for i, m in member.items() if m is flag)
        select |= set(rng.permutation(ids)[: len(ids) // 2].tolist())
    half = {"select": [r for r in records if r["id"] in select],
            "report": [r for r in records if r["id"] not in select]}

    def column(rs: list[dict], attack: str, flag: bool) -> np.ndarray:
        return np.array([r["scores"][attack] for r in rs if member[r["id"]] is flag])

    def auc(rs: list[dict], attack: str) -> float:
        return roc_auc(np.array([r["scores"][attack] for r in rs]), np.array([member[r["id"]] for r in rs]))

    selection_auc = {a: auc(half["select"], a) for a in attacks.ATTACKS}
    best = max(selection_auc, key=selection_auc.get)
    m, u = column(half["report"], best, True), column(half["report"], best, False)
    sizes = [n for n in cfg["sizes"] if n <= min(m.size, u.size)]
    fpr_sizes = [n for n in cfg["sizes"] if 2 * n <= u.size]
    out: dict[str, Any] = {
        "split": "documents split in half (members and non-members separately, seeded); the attack with "
        "the highest ROC-AUC on the selection half is used on the report half",
        "selection_half": {"n_members": int(sum(member[r["id"]] for r in half["select"])),
                           "n_nonmembers": int(sum(not member[r["id"]] for r in half["select"])),
                           "roc_auc": selection_auc},
        "chosen_attack": best, "report_half": {"n_members": int(m.size), "n_nonmembers": int(u.size),
                                               "roc_auc_of_chosen": auc(half["report"], best)},
        "sizes_measured": sizes,
        "size_cap": f"n <= {min(m.size, u.size)} (the report half's smaller pool, drawn without replacement); "
        f"sizes above it ({[n for n in cfg['sizes'] if n not in sizes]}) not measured",
        "fpr_cap": f"two disjoint non-member sets of n need 2n <= {u.size}",
    }
    for test, n_res in (("mann_whitney", cfg["n_resamples"]), ("permutation", cfg["n_resamples_permutation"])):
        out[test] = {
            "power": power(m, u, sizes=sizes, n_resamples=n_res, seed=seed, test=test),
            "fpr": {str(n): false_positive_rate(u, n=n, n_resamples=max(200, n_res), seed=seed,
                                                             test=test) for n in fpr_sizes},
        }
    return out


def canary_exposure(loaded: Any, doc: dict, cfg: dict, seed: int) -> dict[str, Any]:
    """Skew-normal estimate from sampled candidates; the exact pruned digit-tree rank where the estimate
    is low enough for the walk to stay small (a memorized canary prunes almost the whole tree)."""
    estimate = exposure.exposure(loaded, doc["text"], doc["canary"], method="skewnorm",
                                 n_samples=cfg["n_samples"], seed=seed)
    row = {"id": doc["id"], "member": doc["member"], "copies": doc["copies"], "skewnorm": estimate}
    if estimate["rank"] <= cfg["exact_if_rank_below"]:
        row["exact"] = exposure.exposure(loaded, doc["text"], doc["canary"], method="exact")
    row["final"] = row.get("exact", estimate)
    return row


def exposure_table(rows: list[dict]) -> dict[str, Any]:
    """Per copies (0 = non-member canaries): mean / max exposure, how many reached rank 1 (saturation:
    log2 of the space), and which method gave each number."""
    table: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: r["copies"]):
        t = table.setdefault(str(row["copies"]), {"canaries": 0, "exposures": [], "rank_1": 0, "methods": {}})
        t["canaries"] += 1
        t["exposures"].append(row["final"]["exposure"])
        t["rank_1"] += int(row["final"]["rank"] <= 1)
        t["methods"][row["final"]["method"]] = t["methods"].get(row["final"]["method"], 0) + 1
    for t in table.values():
        t["mean_exposure"], t["max_exposure"] = float(np.mean(t["exposures"])), float(np.max(t["exposures"]))
    return table


def extraction_docs(members: list[dict], nonmembers: list[dict], cfg: dict) -> list[dict]:
    """All mails of the first people of each recurrence count (so a value's recurrence is whole) plus
    the first non-member mails: the full lab costs hours of sampling on a CPU."""
    people: dict[int, list[str]] = {}
    for d in members:
        if d["kind"] == "email":
            r = int(d["person"].split("-")[1].rstrip("x"))
            if d["person"] not in people.setdefault(r, []):
                people[r].append(d["person"])
    chosen = {p for r, n in cfg["people_per_recurrence"].items() for p in sorted(people.get(int(r), []))[:n]}
    mails = [d for d in members if d["kind"] == "email" and d["person"] in chosen]
    return mails + [d for d in nonmembers if d["kind"] == "email"][: cfg["nonmember_mails"]]


def pii_rates(occurrences: list[dict], seen: list[str] | None) -> dict[str, Any]:
    """extraction_rates overall and per PII type."""
    out = extraction.extraction_rates(occurrences, seen)
    types = sorted({o["type"] for o in occurrences})
    out["by_type"] = {t: extraction.extraction_rates([o for o in occurrences if o["type"] == t], seen)
                      for t in types}
    return out


def main() -> None:  # noqa: C901, PLR0915 - one linear pipeline, stage by stage
    ap = experiment_parser(__doc__, ROOT)
    ap.add_argument("--run-dir", type=Path, help="lab, fine-tuned model and step outputs (default runs/<name>)")
    ap.add_argument("--stop-after", choices=["finetune", "scores", "exposure", "passages", "extraction"],
                    help="end after this stage (the results file says which stages are done)")
    args = ap.parse_args()
    cfg = CONFIGS["quick" if args.quick else "full"]
    seed, name = args.seed, cfg["name"]
    run = args.run_dir or ROOT / "runs" / name
    steps = StepCache(run)
    out_path, figures = args.out / f"{name}.json", args.figures
    started, load_start = time.perf_counter(), os.getloadavg()
    results: dict[str, Any] = {"config": cfg, "run_dir": str(run), "stages_done": [],
                               "machine_load": {"start": load_start}}

    def publish(stage: str) -> None:
        results["stages_done"].append(stage)
        results["machine_load"]["end"] = os.getloadavg()
        results["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
        results["step_seconds"] = {p.name.removesuffix(".done.json"): steps.seconds(p.name.removesuffix(".done.json"))
                                   for p in sorted((run / "steps").glob("*.done.json"))}
        save_results(out_path, results, seed=seed)
        print(f"[{time.strftime('%H:%M:%S')}] {stage} done -> {out_path}", flush=True)

    # 1. lab and fine-tune
    lab = run / "lab"
    if not (lab / "manifest.json").exists():
        build_lab(lab, preset=cfg["preset"], seed=seed)
    members, nonmembers, manifest = load_lab(lab)
    docs = members + nonmembers
    ft_dir = run / "finetune"
    t = time.perf_counter()
    prov = finetune(cfg["model"], lab, ft_dir, seed=seed, progress=not args.quick, **cfg["finetune"])
    weights = {"final": file_sha256(ft_dir / "model.safetensors")}
    weights |= {f"checkpoint-{s}": file_sha256(ft_dir / f"checkpoint-{s}" / "model.safetensors")
                for s in cfg["finetune"]["save_steps"]}
    results["lab"] = {"dir": str(lab), "counts": manifest["counts"], "canary": manifest["canary"],
                      "pii_recurrence": manifest["pii"]["member_values_by_recurrence"]}
    results["finetune"] = {
        "dir": str(ft_dir), "model_safetensors_sha256": weights, "seconds_this_invocation": time.perf_counter() - t,
        "provenance": {k: v for k, v in prov.items() if k not in ("seen_total", "checkpoints", "data")},
        "data": {k: v for k, v in prov["data"].items() if k != "docs"},
        "checkpoints": [{k: v for k, v in c.items() if k != "seen"} | {"documents_seen": len(c["seen"])}
                        for c in prov["checkpoints"]],
    }
    publish("finetune")
    if args.stop_after == "finetune":
        return

    @cache
    def model(tag: str) -> Any:
        path = {"final": str(ft_dir), "base": cfg["model"]}.get(tag, str(ft_dir / tag))
        loaded = load_model(path)
        loaded.model.eval()
        return loaded

    base_sha = prov["base_model"]["weights_sha256"]

    def sha_of(tag: str) -> str:
        return base_sha if tag == "base" else weights[tag]

    # 2-4. attacks, evaluation, dataset-level test
    sc = cfg["score"]
    records = []
    for i, chunk in enumerate(chunks(docs, sc["chunk"])):
        records += cached(steps, f"scores-{i:03d}", lambda c=chunk: attacks.score_texts(
            model("final"), c, reference=model("base"), k=sc["k"], batch_size=sc["batch_size"]),
            inputs={"docs": doc_key(chunk), "target": weights["final"], "reference": base_sha},
            settings=sc, code=[attacks])
    results["mia"] = {"target": "final fine-tuned model", "reference": f"base {cfg['model']}",
                      "higher_score": "more likely a member",
                      **evaluate_groups(records, docs, cfg["n_boot"], seed)}
    roc_figures(records, docs, f"{cfg['model']} lab, members vs non-members",
                figures / f"{name}_roc.png", figures / f"{name}_roc_loglog.png")
    results["dataset_test"] = dataset_level(records, docs, cfg["dataset_test"], seed)
    publish("scores")
    if args.stop_after == "scores":
        return

    # 5. exposure
    canaries = [d for d in docs if d.get("canary")]
    canaries.sort(key=lambda d: -d["copies"])  # the cheap, memorized ones first
    results["exposure"] = {"protocol": cfg["exposure"], "space": manifest["canary"]["space"],
                           "space_size": manifest["canary"]["space_size"],
                           "saturation_bits": float(np.log2(manifest["canary"]["space_size"]))}
    for tag in ("final", "base"):
        rows = [cached(steps, f"exposure-{tag}-{d['id'].replace('/', '_')}",
                       lambda d=d, tag=tag: canary_exposure(model(tag), d, cfg["exposure"], seed),
                       inputs={"doc": doc_key([d]), "canary": d["canary"], "model": sha_of(tag)},
                       settings=cfg["exposure"], code=[exposure, canary_exposure]) for d in canaries]
        results["exposure"][tag] = {"by_copies": exposure_table(rows), "canaries": rows}
        publish(f"exposure-{tag}")
    if args.stop_after == "exposure":
        return

    # 6. passages: k-extractability / 32-32 of member documents, per kind
    results["passages"] = {}
    kinds = sorted({d["kind"] for d in members})
    for tag in ("final", "base"):
        results["passages"][tag] = {
            kind: cached(steps, f"passages-{tag}-{kind}", lambda kind=kind, tag=tag: extraction.passage_extractability(
                model(tag), [d for d in members if d["kind"] == kind], **cfg["passages"]),
                inputs={"docs": doc_key([d for d in members if d["kind"] == kind]), "model": sha_of(tag)},
                settings=cfg["passages"], code=[extraction]) for kind in kinds}
    publish("passages")
    if args.stop_after == "passages":
        return

    # 7. PII extraction: final (seen = every member), base (guessable baseline), an early checkpoint
    ex = cfg["extraction"]
    mails = extraction_docs(members, nonmembers, ex)
    early = f"checkpoint-{ex['checkpoint']}"
    seen_early = sorted(next(c["seen"] for c in prov["checkpoints"] if c["step"] == ex["checkpoint"]))
    results["extraction"] = {"documents": {"members": sum(d["member"] for d in mails),
                                           "nonmembers": sum(not d["member"] for d in mails),
                                           "rule": extraction_docs.__doc__.split("\n")[0] + " ..."},
                             "settings": ex}
    # the base and the early checkpoint only on every `baseline_every`-th chunk (sampling costs ~80 s
    # a chunk on 2 CPU cores); the final model's rates on those same chunks are reported beside them
    every = cfg["baseline_every"]
    for tag, seen in (("final", [d["id"] for d in members]), ("base", None), (early, seen_early)):
        occurrences = []
        for i, chunk in enumerate(chunks(mails, ex["chunk"])):
            if tag != "final" and i % every:
                continue
            occurrences += cached(steps, f"pii-{tag}-{i:03d}", lambda c=chunk, tag=tag: extraction.pii_extraction(
                model(tag), c, seed=seed, batch_size=ex["batch_size"])["occurrences"],
                inputs={"docs": doc_key(chunk), "model": sha_of(tag)}, settings=ex, code=[extraction])
        results["extraction"][tag] = {"seen_ids": "all members" if tag == "final" else
                                      (None if seen is None else f"{len(seen)} documents seen by step "
                                       f"{ex['checkpoint']}"), **pii_rates(occurrences, seen)}
        if tag == "final" and every > 1:
            sub = {(d["id"]) for i, c in enumerate(chunks(mails, ex["chunk"])) if not i % every for d in c}
            results["extraction"]["final_on_baseline_chunks"] = {
                "chunks": f"every {every}th chunk of {ex['chunk']} mails ({len(sub)} mails), as base and {early}",
                **pii_rates([o for o in occurrences if o["doc_id"] in sub], [d["id"] for d in members])}
        publish(f"extraction-{tag}")
    results["complete"] = True
    publish("all")


if __name__ == "__main__":
    main()
