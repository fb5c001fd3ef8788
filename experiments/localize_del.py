"""DEL benchmark (after Chang et al. 2024) on smollm2-135m: drop each method's top neurons per sequence.

For each memorized sequence (32-token prefix, 32-token suffix, from the labels cache of
experiments/suppress.py), each localization method scores every MLP neuron against the suffix; its
top 0.5% (230 of 46,080) are zero-ablated and we measure, with memprobe.labels: the drop in that
sequence's teacher-forced suffix accuracy and greedy-match score, the mean drop on the other
memorized sequences, and the perplexity change on non-memorized text. Scores and measurements are
cached under cache/intervene/del/ so reruns resume. Zero-Out needs 46,080 forwards per sequence and is
left to the INJ model.

    .venv/bin/python experiments/localize_del.py           # smollm2-135m
    .venv/bin/python experiments/localize_del.py --quick   # tiny trained LM, < 60 s
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memprobe.intervene import localizers as L
from memprobe.intervene.ablation import hooked_edit
from memprobe.labels import sequence_labels, token_labels
from memprobe.models import load_model
from memprobe.results import experiment_parser, save_results
from memprobe.studies.cache import StepCache
from memprobe.studies.suppression import label_records, suppression_documents

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache" / "intervene" / "del"
PREFIX = SUFFIX = 32


def _measure(model, edit, mem_ids, ctrl_ids) -> dict:
    def run():
        tok = token_labels(model, mem_ids)
        seq = sequence_labels(model, mem_ids, prefix_len=PREFIX, suffix_len=SUFFIX)
        ctrl = token_labels(model, ctrl_ids)
        return tok, seq, ctrl

    if edit is None:
        tok, seq, ctrl = run()
    else:
        with hooked_edit(model, edit):
            tok, seq, ctrl = run()
    return {"accuracy": [float(t.correct[PREFIX:].mean()) for t in tok],
            "greedy_match": [float(s.memorization_score) for s in seq],
            "perplexity": float(math.exp(np.concatenate([t.loss[1:] for t in ctrl]).mean()))}


def main(argv: list[str] | None = None) -> int:
    ap = experiment_parser(__doc__, ROOT)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.005)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    if args.quick:
        from memprobe.corpora import bundled_corpus
        from memprobe.train.tiny_lm import train_tiny_lm

        docs = [d["text"][:120] for d in bundled_corpus(None, seed=args.seed, include_model_samples=False)
                if d["kind"] in ("shakespeare", "novel")]
        loaded = train_tiny_lm(docs[:3], steps=100, seq_len=64, batch=8, lr=1e-2, seed=args.seed)
        mem_ids = [loaded.encode(t)[: PREFIX + SUFFIX] for t in docs[:3]]
        ctrl_ids = [loaded.encode(t)[:64] for t in docs[-2:]]
        cache, steps, ig_steps = Path(tempfile.mkdtemp(prefix="localize-del-quick-")), 5, 2  # exercises the cache
    else:
        loaded = load_model("smollm2-135m")
        # the labels experiments/suppress.py uses (same texts, same cache: computed once for both)
        records = label_records(loaded, suppression_documents(args.seed), 64,
                                StepCache(ROOT / "cache" / "intervene" / "smollm2"))
        mem = sorted((r for r in records if r["role"] == "candidate" and len(r["token_ids"]) >= PREFIX + SUFFIX),
                     key=lambda r: -float(np.mean(r["memorized"][PREFIX:])))[: args.sequences]
        ctrl = [r for r in records if r["kind"] in ("novel", "pii")][:4]
        mem_ids = [r["token_ids"][: PREFIX + SUFFIX] for r in mem]
        ctrl_ids = [r["token_ids"] for r in ctrl]
        cache, steps, ig_steps = CACHE, 8, 4
    model = loaded.model
    background = [L.Target.suffix(ctrl_ids[0], 1)]
    methods = {
        "activations": lambda t: L.Activations(model).localize(t, background).scores,
        "attribution": lambda t: L.Attribution(model).localize(t).scores,
        "integrated_gradients": lambda t: L.IntegratedGradients(model, steps=ig_steps).localize(t).scores,
        "slimming": lambda t: L.Slimming(model, steps=steps, seed=args.seed).localize(t, background).scores,
        "hard_concrete": lambda t: L.HardConcrete(model, steps=steps, seed=args.seed).localize(t, background).scores,
        "probe_neurons": lambda t: L.ProbeNeurons(model, max(1, round(args.fraction * L.mlp_shape(model)[0] * L.mlp_shape(model)[1]))
                                   ).localize(t, background).scores,
        "random": lambda t: L.RandomScores(model, args.seed + int(t.token_ids.sum())).localize().scores,
    }
    # Scores and measurements are kept in a content-keyed cache (memprobe.studies.cache): keyed by the
    # model, the sequences, the settings and the localizers' code, so a rerun resumes where it stopped.
    steps_cache = None if cache is None else StepCache(cache)
    key_inputs = {"model": {k: loaded.info.get(k) for k in ("name", "sha256")}, "memorized": mem_ids,
                  "controls": ctrl_ids}
    settings = {"fraction": args.fraction, "steps": steps, "ig_steps": ig_steps, "seed": args.seed}

    def measure(key: str, edit, scores=None) -> dict:
        if steps_cache is None:
            return _measure(model, edit, mem_ids, ctrl_ids)
        return steps_cache.json(f"measure {key}", lambda: _measure(model, edit, mem_ids, ctrl_ids),
                                inputs={**key_inputs, "scores": scores}, settings=settings, code=[_measure, L])

    def localize(name: str, j: int, fn, target) -> tuple[torch.Tensor, float]:
        if steps_cache is None:
            t = time.time()
            return fn(target).detach(), time.time() - t
        step, output = f"scores {name} {j}", f"scores/{name}_{j}.safetensors"

        def write(path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"scores": fn(target).detach().contiguous()}, str(path))

        steps_cache.run(step, [output], write, inputs={**key_inputs, "sequence": j}, settings=settings,
                        code=[L, fn, _measure])
        return load_file(str(steps_cache.root / output))["scores"], steps_cache.seconds(step) or 0.0

    base = measure("base", None)
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    for j, ids in enumerate(mem_ids):
        target = L.Target.suffix(ids, PREFIX)
        for name, fn in methods.items():
            scores, seconds = localize(name, j, fn, target)
            after = measure(f"{name}:{j}", L.top_neurons(scores, args.fraction), scores)
            others = [i for i in range(len(mem_ids)) if i != j]
            rows[name].append({
                "sequence": j, "seconds": seconds,
                "target_accuracy_drop": base["accuracy"][j] - after["accuracy"][j],
                "target_greedy_drop": base["greedy_match"][j] - after["greedy_match"][j],
                "other_accuracy_drop": float(np.mean([base["accuracy"][i] - after["accuracy"][i] for i in others])) if others else None,
                "perplexity_change": after["perplexity"] - base["perplexity"],
            })
    summary = {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if k != "sequence" and rs[0][k] is not None}
               for m, rs in rows.items()}
    results = {"model": loaded.info, "fraction": args.fraction, "base": base, "summary": summary, "rows": rows,
               "note": "drops are absolute (accuracy points in [0,1]); perplexity change is absolute",
               "chang_et_al_anchor": {"model": "Pythia-6.9B", "method": "Hard Concrete", "fraction": 0.005,
                                      "target_accuracy": "-57.7%", "other_memorized": "-14.7%", "perplexity": "+0.52"},
               "wall_seconds": time.time() - t0}
    tag = "_quick" if args.quick else ""
    save_results(args.out / f"localize_del{tag}.json", results, seed=args.seed)
    _figure(summary, args.figures / f"intervene_del{tag}.png", loaded.name, args.fraction)
    print(json.dumps(summary, indent=1))
    return 0


def _figure(summary: dict, path: Path, model_name: str, fraction: float) -> None:
    import matplotlib.pyplot as plt

    from memprobe.plots import save_figure

    names = list(summary)
    keys = ("target_accuracy_drop", "target_greedy_drop", "other_accuracy_drop")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar(np.arange(len(names)) + i * w, [100 * summary[n].get(k, np.nan) for n in names], w, label=k)
    ax.set_xticks(np.arange(len(names)) + w, names, rotation=20)
    ax.set_ylabel("drop (accuracy points, %)")
    ax.legend(fontsize=7)
    ax2.bar(names, [summary[n]["perplexity_change"] for n in names])
    ax2.set_ylabel("perplexity change (absolute)")
    ax2.tick_params(axis="x", rotation=20)
    fig.suptitle(f"DEL on {model_name}: drop each method's top {100 * fraction:g}% neurons per sequence")
    save_figure(fig, path, script="experiments/localize_del.py")


if __name__ == "__main__":
    raise SystemExit(main())
