"""`memprobe audit`: from a model and texts to what it memorized, where, and how to suppress it.

Each step writes its outputs into the audit directory. A step is done only when its outputs were
verified after it ran and `steps/<step>.done.json` (written last, atomically) records them under a
key of the step's inputs, settings and code; a re-run reuses a step whose record matches and whose
outputs still verify, and re-runs any other: a killed capture resumes shard by shard, anything else
half-written is deleted and made again. So an interrupted audit finishes with the results an
uninterrupted one would have given, and a finished one is not recomputed.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError
from memprobe.io.atomic import remove_staged, staged_directory
from memprobe.jsonl import read_jsonl, write_jsonl
from memprobe.report import render_report
from memprobe.results import write_json

DEFAULT_SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"


@dataclass(frozen=True)
class AuditConfig:
    """What an audit was asked to do; an audit directory holds the audit of one config only."""

    model: str = "smollm2-135m"
    texts: str | None = None  # JSONL; None = the bundled corpus
    quick: bool = False
    seed: int = 0
    sites: str = DEFAULT_SITES
    dtype: str = "bfloat16"
    min_prob: float = 0.5


class Audit:
    """Runs the audit steps in order, each cached in `out/` under its own name."""

    def __init__(self, config: AuditConfig, out: str | Path) -> None:
        self.config = config
        self.out = Path(out)
        self._loaded = None
        self._claim_directory()
        timings = self.out / "timings.json"
        self.timings: dict[str, float] = json.loads(timings.read_text()) if timings.exists() else {}

    def _claim_directory(self) -> None:
        marker = self.out / "audit-config.json"
        mine = asdict(self.config)
        if marker.exists():
            theirs = json.loads(marker.read_text())
            if theirs != mine:
                diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
                raise MemprobeError(
                    f"--out {self.out} holds an audit with different settings {diff} (stored, asked): "
                    "choose another --out, or delete that directory to start over"
                )
        else:
            if self.out.exists() and any(self.out.iterdir()):
                raise MemprobeError(f"--out {self.out} is not empty and holds no audit: choose another --out")
            write_json(marker, mine)

    @property
    def loaded(self):
        if self._loaded is None:
            from memprobe.models import load_model

            self._loaded = load_model(self.config.model)
        return self._loaded

    def step(self, name: str, output: str, fn: Callable[[Path], Any], *, inputs: Sequence[str | Path] = (),
             also: Sequence[str] = (), resumable: Sequence[str] = ()) -> Path:
        """Run `fn(out/output)` unless the step is done (see the module docstring); time it.

        `inputs`: files or directories it reads (audit-relative names or paths), part of its key;
        `also`: other outputs it writes (verified and recorded like `output`); `resumable`: outputs a
        killed attempt with the same key leaves for the next one to continue (the activation store)
        instead of being deleted.
        """
        path = self.out / output
        outputs = [output, *also]
        key = self._step_key(name, fn, inputs)
        record = self.out / "steps" / f"{_slug(name)}.done.json"
        if self._verified_record(record, key):
            print(f"[audit] {name}: reusing {path}")
            return path
        self._clear_stale(name, key, [*outputs, *resumable], resumable)
        print(f"[audit] {name} ...", flush=True)
        t = time.perf_counter()
        fn(path)
        seconds = time.perf_counter() - t
        digests = {o: _output_digest(self.out / o) for o in outputs}
        write_json(record, {"step": name, "key": key, "outputs": digests, "seconds": seconds})
        self.timings[name] = seconds
        write_json(self.out / "timings.json", self.timings)  # kept, so a resumed audit reports every step
        return path

    def _step_key(self, name: str, fn: Callable[[Path], Any], inputs: Sequence[str | Path]) -> str:
        """What a step's result depends on: its inputs' content, the audit settings, the code."""
        from memprobe import __version__

        try:
            code = inspect.getsource(fn)
        except (OSError, TypeError):
            code = getattr(fn, "__qualname__", repr(fn))
        found = {}
        for item in inputs:
            where = self.out / item  # an absolute path stays itself
            found[str(item)] = _output_digest(where)
        payload = {"step": name, "config": asdict(self.config), "inputs": found,
                   "code": {"memprobe": __version__, "step": hashlib.sha256(code.encode()).hexdigest()}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _verified_record(self, record: Path, key: str) -> bool:
        """Whether `record` names this key and every output it lists is still there, whole and unchanged."""
        try:
            done = json.loads(record.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(done, dict) or done.get("key") != key or not isinstance(done.get("outputs"), dict):
            return False
        try:
            return all(_output_digest(self.out / o) == d for o, d in done["outputs"].items())
        except (MemprobeError, OSError):  # damaged, incomplete, or vanished while being read
            return False

    def _clear_stale(self, name: str, key: str, outputs: Sequence[str], resumable: Sequence[str]) -> None:
        """Before (re-)running a step: delete what an earlier, unverified attempt left.

        Outputs in `resumable` survive when that attempt had the same key (it is continued);
        `steps/<step>.started.json` records the key of the attempt in progress.
        """
        started = self.out / "steps" / f"{_slug(name)}.started.json"
        try:
            same_key = json.loads(started.read_text()).get("key") == key
        except (OSError, ValueError, AttributeError):
            same_key = False
        for output in outputs:
            target = self.out / output
            remove_staged(target)
            if output in resumable and same_key:
                continue
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        write_json(started, {"step": name, "key": key})

    # -- steps ------------------------------------------------------------------------------

    def texts(self, path: Path) -> None:
        from memprobe.corpora import bundled_corpus

        # --quick keeps 3 texts per kind, so it samples only the model-sample controls it keeps (2 prompts)
        prompts = 2 if self.config.quick else None
        if self.config.texts:
            docs = read_jsonl(self.config.texts)
            if not docs:
                raise MemprobeError(f"{self.config.texts} holds no documents: give one {{'id', 'text'}} object per line")
            # Users' texts are candidates unless they say otherwise; controls come from the bundled corpus.
            docs = [{"role": "candidate", "split_group": d["id"], **d} for d in docs]
            if not any(d["role"] == "control" for d in docs):
                docs += [d for d in bundled_corpus(self.loaded, seed=self.config.seed, sample_prompts=prompts)
                         if d.get("role") == "control"]
        else:
            docs = bundled_corpus(self.loaded, seed=self.config.seed, sample_prompts=prompts)
        if self.config.quick:
            docs = _quick_subset(docs, per_kind=3)
        write_jsonl(path, docs)

    def label(self, path: Path) -> None:
        """Teacher-forced labels from the capture's own forward (one pass), then greedy extraction."""
        from memprobe.labels import encode_documents, label_documents

        docs = read_jsonl(self.out / "texts.jsonl")
        encode_documents(self.loaded, docs)  # refuse bad texts with the labeller's messages before capturing
        t = time.perf_counter()
        store = self._capture_store(docs)
        t_capture = time.perf_counter() - t
        records = label_documents(self.loaded, docs, min_prob=self.config.min_prob, store=store, progress=True)
        # The two parts of the label step's time (which includes both): the one forward, and the decode.
        self.timings["capture"] = t_capture
        self.timings["greedy extraction"] = time.perf_counter() - t - t_capture
        for r in records:
            r["model"] = self.loaded.info
        write_jsonl(path, records)

    def _capture_store(self, docs: list[dict[str, Any]]):
        """Activations and per-token statistics of the texts from one forward per batch (resumable)."""
        from memprobe.capture import capture

        light = [{k: d[k] for k in ("id", "text", "kind") if k in d} for d in docs]
        return capture(self.loaded, light, self.config.sites, self.out / "store", dtype=self.config.dtype,
                       token_stats=True)

    def probes(self, path: Path) -> None:
        """One probe per captured site, cross-validated by document family; AUC beside baselines."""
        import numpy as np

        from memprobe.memdata import REPETITION, build_token_set, group_folds
        from memprobe.metrics import roc_auc
        from memprobe.probes import ProbeSweep, detection, read_rows
        from memprobe.probes.artefact import DEFAULT_WINDOW
        from memprobe.store import ActivationStore

        records = read_jsonl(self.out / "labels.jsonl")
        store = ActivationStore.open(self.out / "store")
        tokens = build_token_set(records)
        main = tokens.category != REPETITION
        y = tokens.label
        positives, negatives = sorted(set(tokens.group[main & (y == 1)])), sorted(set(tokens.group[main & (y == 0)]))
        if len(positives) < 2 or len(negatives) < 2:
            write_json(path, {"status": "skipped", "reason": (
                f"{len(positives)} memorized and {len(negatives)} control document families: probes need at "
                "least 2 of each to be trained and tested on different documents")})
            return
        rows, starts = tokens.store_rows(store, -1), tokens.store_doc_starts(store)
        # A screening sweep: 3 folds and a short L-BFGS budget keep the audit within minutes on a CPU;
        # experiments/probe_layers.py runs the full 5-fold evaluation with bootstrap intervals.
        folds = group_folds(tokens.group, y, n_folds=min(3, len(positives)), seed=self.config.seed)
        sweep = ProbeSweep(max_iter=60, progress=True, window=DEFAULT_WINDOW)
        oof, shuffled, _ = sweep.cross_validate(store, rows, y, folds, n_shuffled=1, seed=self.config.seed,
                                                trainable=main, doc_start=starts)
        n_boot = 0 if self.config.quick else 100
        per_site = {s: {"probe": detection(oof[s][main], y[main], tokens.doc_id[main], n_boot=n_boot, seed=self.config.seed),
                        "shuffled_labels_auc": roc_auc(shuffled[s][main], y[main])} for s in oof}
        best = max(per_site, key=lambda s: per_site[s]["probe"]["roc_auc"])
        baselines = {name: detection(v[main], y[main], tokens.doc_id[main], n_boot=0)
                     for name, v in tokens.baselines().items()}
        mlp_sites = [s for s in per_site if s.endswith("mlp.hook_post")]
        top_neurons = []
        if mlp_sites:
            best_mlp = max(mlp_sites, key=lambda s: per_site[s]["probe"]["roc_auc"])
            probe = sweep.fit(store, rows[main], y[main], sites=[best_mlp], doc_start=starts[main])[best_mlp]
            X = read_rows(store, best_mlp, rows[main], window=DEFAULT_WINDOW, doc_start=starts[main]).numpy()
            ym = y[main]
            for i in np.argsort(-np.abs(probe.standardized_coef_))[:15]:
                top_neurons.append({"neuron": f"{best_mlp}[{int(i)}]", "weight": float(probe.standardized_coef_[i]),
                                    "mean_memorized": float(X[ym == 1, i].mean()), "mean_control": float(X[ym == 0, i].mean())})
        _probe_heatmap({s: v["probe"]["roc_auc"] for s, v in per_site.items()}, self.out / "figures" / "probe_auc.png")
        write_json(path, {"status": "ok", "best_site": best, "per_site": per_site, "baselines": baselines,
                          "top_neurons": top_neurons, "token_counts": tokens.counts(), "window": DEFAULT_WINDOW,
                          "split": f"{int(folds.max()) + 1}-fold cross-validation grouped by document family"})

    def patching(self, path: Path) -> None:
        """Activation patching on the most memorized text: clean prefix vs a perturbed prefix."""
        from memprobe.intervene.patching import activation_patching, corrupt_prefix

        target = _most_memorized(read_jsonl(self.out / "labels.jsonl"), min_prefix=8)
        if target is None:
            write_json(path, {"status": "skipped", "reason": "no memorized token with 8 or more tokens before it"})
            return
        record, t = target
        start = max(0, t - 20)
        clean = record["token_ids"][start:t]
        vocab = sorted(set(record["token_ids"]))
        corrupt = corrupt_prefix(clean, n_swaps=max(2, len(clean) // 4), vocab=vocab, seed=self.config.seed)
        layers = None if not self.config.quick else [0, 1]
        result = activation_patching(self.loaded, clean, corrupt, record["token_ids"][t], layers=layers)
        write_json(path, {"status": "ok", "document": record["id"], "target_position": t,
                          "target_token": self.loaded.decode([record["token_ids"][t]]), **result.to_dict()})
        fig = result.plot(title=f"activation patching: {record['id']}")
        from memprobe.plots import save_figure

        save_figure(fig, self.out / "figures" / "patching.png", script="memprobe audit")

    def suppress(self, path: Path) -> None:
        """Learn a suppression edit on half the memorized texts; measure it on the other half."""
        from memprobe.intervene.ablation import save_edit
        from memprobe.intervene.suppress import evaluate, split_memorized, targets_from_labels
        from memprobe.intervene.weight_edit import random_low_rank_like, train_low_rank_edit

        records = read_jsonl(self.out / "labels.jsonl")
        parts = split_memorized(records, seed=self.config.seed)
        if not parts["build_memorized"] or not parts["heldout_memorized"] or not parts["build_control"]:
            write_json(path, {"status": "skipped", "reason": "too few memorized texts (memorized fraction >= 0.5) "
                              "and controls to build a patch and test it on texts it was not built from",
                              "split_sizes": {k: len(v) for k, v in parts.items()}})
            return
        cut = 64
        ids = {k: [r["token_ids"][:cut] for r in v] for k, v in parts.items()}
        mem = targets_from_labels(ids["build_memorized"], [r["memorized"][:cut] for r in parts["build_memorized"]])
        ctrl = targets_from_labels(ids["build_control"])
        model = self.loaded.model
        held_mem, held_ctrl = ids["heldout_memorized"], ids["heldout_control"] or ids["build_control"]
        base = evaluate(model, held_mem, held_ctrl)
        edit = train_low_rank_edit(model, mem, ctrl, seed=self.config.seed, max_tokens=cut,
                                   max_controls=MAX_TRAIN_CONTROLS)
        random_edit = random_low_rank_like(edit, seed=self.config.seed)
        curve, random_curve = [], []
        for strength in SUPPRESSION_STRENGTHS:
            for e, into in ((edit, curve), (random_edit, random_curve)):
                row = evaluate(model, held_mem, held_ctrl, e.with_strength(strength))
                into.append({"strength": strength, **row, **_changes(row, base)})
        within = [r for r in curve if r["ppl_change"] <= PPL_BUDGET]
        # The strongest edit within the perplexity budget; if none fits, the mildest one, flagged as such.
        chosen = {**(max(within, key=lambda r: r["suppression"]) if within else curve[0]), "within_budget": bool(within)}
        final = edit.with_strength(chosen["strength"])
        save_edit(final, self.out / "edit.safetensors")  # the export step bakes it into patched-model/
        write_json(path, {"status": "ok", "method": SUPPRESSION_METHOD, "size": edit.size, "base": base,
                          "training": edit.meta, "curve": curve, "random_baseline": random_curve, "chosen": chosen,
                          "split_sizes": {k: len(v) for k, v in parts.items()},
                          "heldout_ids": [r["id"] for r in parts["heldout_memorized"]],
                          "patched_model": str((self.out / "patched-model").resolve())})
        _pareto_figure(curve, random_curve, self.out / "figures" / "suppression.png")

    def export(self, path: Path) -> None:
        """Bake the chosen edit into a HF model directory that appears at `path` whole or not at all."""
        from memprobe.intervene.ablation import load_edit
        from memprobe.intervene.export import export_patched
        from memprobe.results import provenance

        edit = self.out / "edit.safetensors"
        if not edit.exists():
            return  # suppression was skipped: there is nothing to export
        # Staged here too (export_patched stages its own writes), so that the test pause below falls
        # between writing the model and publishing it.
        with staged_directory(path) as staged:
            export_patched(self.loaded, load_edit(edit), staged, provenance=provenance(self.config.seed))
            _pause_for_test("export")

    def relabel(self, path: Path) -> None:
        """Greedy continuations of the most memorized texts, before and after the patch."""
        from memprobe.labels import sequence_labels
        from memprobe.models import load_model

        if not (self.out / "patched-model").exists():
            write_json(path, {"status": "skipped", "reason": "no patched model (see suppression)"})
            return
        records = read_jsonl(self.out / "labels.jsonl")
        top = sorted((r for r in records if r.get("role") == "candidate" and r.get("memorization_score") is not None),
                     key=lambda r: -(r["memorized_fraction"] or 0))[:6]
        patched = load_model(str(self.out / "patched-model"))  # the exported directory, as a user loads it
        after = sequence_labels(patched.model, [r["token_ids"] for r in top])
        rows = []
        for r, a in zip(top, after, strict=True):
            rows.append({"id": r["id"], "prefix": self.loaded.decode(r["token_ids"][:32]),
                         "true_suffix": self.loaded.decode(r["token_ids"][32:64]),
                         "before": r["continuation_text"], "score_before": r["memorization_score"],
                         "after": patched.decode(a.continuation.tolist()), "score_after": a.memorization_score})
        write_json(path, {"status": "ok", "continuations": rows})

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        user_texts = [Path(self.config.texts).absolute()] if self.config.texts else []
        self.step("texts", "texts.jsonl", self.texts, inputs=user_texts)
        # The label step captures the store on its way (one forward feeds labels, MIA statistics and
        # activations), so the store is one of its outputs; a killed one resumes it shard by shard.
        self.step("label", "labels.jsonl", self.label, inputs=["texts.jsonl"], also=["store"], resumable=["store"])
        self.step("probe sweep", "probes.json", self.probes, inputs=["labels.jsonl", "store"],
                  also=["figures/probe_auc.png"])
        self.step("activation patching", "patching.json", self.patching, inputs=["labels.jsonl"],
                  also=["figures/patching.png"])
        self.step("suppression patch", "suppression.json", self.suppress, inputs=["labels.jsonl"],
                  also=["edit.safetensors", "figures/suppression.png"])
        self.step("export patched model", "patched-model", self.export, inputs=["edit.safetensors"])
        self.step("re-label with the patch", "relabel.json", self.relabel, inputs=["labels.jsonl", "patched-model"])
        summary = self.summary()
        self.step("report", "report.html", lambda p: render_report(self.out, p),
                  inputs=["labels.jsonl", "probes.json", "patching.json", "suppression.json", "relabel.json",
                          "figures"])
        return summary

    def summary(self) -> dict[str, Any]:
        from memprobe.labels import summarize

        records = read_jsonl(self.out / "labels.jsonl")
        summary = {"model": records[0]["model"] if records else None, "config": asdict(self.config),
                   "by_kind": summarize(records), "timings_s": self.timings}
        for name in ("probes", "patching", "suppression", "relabel"):
            f = self.out / f"{name}.json"
            if f.exists():
                summary[name] = json.loads(f.read_text())
        write_json(self.out / "results.json", summary)
        return summary


PPL_BUDGET = 0.05  # largest perplexity increase on control texts that a shipped patch may cost
SUPPRESSION_METHOD = "low-rank-edit"  # memprobe.intervene.weight_edit; see README for why not neuron ablation
SUPPRESSION_STRENGTHS = (0.25, 0.5, 1.0, 1.5)
MAX_TRAIN_CONTROLS = 16


def _changes(row: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    rate = base["memorized_token_rate"]
    return {"suppression": (rate - row["memorized_token_rate"]) / rate if rate else 0.0,
            "ppl_change": row["perplexity"] / base["perplexity"] - 1,
            "top1_change": row["top1_accuracy"] - base["top1_accuracy"]}


def _pareto_figure(curve: list[dict], random_curve: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    from memprobe.plots import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for rows, label, style in ((curve, SUPPRESSION_METHOD, "o-"), (random_curve, "random edit (same size)", "s--")):
        ax.plot([100 * r["ppl_change"] for r in rows], [100 * r["suppression"] for r in rows], style, label=label)
        for r in rows:
            ax.annotate(f"x{r['strength']}", (100 * r["ppl_change"], 100 * r["suppression"]), fontsize=7)
    ax.axvline(5, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("perplexity change on control texts (%)")
    ax.set_ylabel("memorized-token rate reduction, held-out texts (%)")
    ax.set_title("suppression vs cost")
    ax.legend(fontsize=8)
    save_figure(fig, path, script="memprobe audit")


def _probe_heatmap(auc: dict[str, float], path: Path) -> None:
    import numpy as np

    from memprobe.plots import heatmap, save_figure
    from memprobe.sites import layer_of, site_kind

    kinds = list(dict.fromkeys(site_kind(s) for s in auc))
    n_layers = max(layer_of(s) for s in auc) + 1
    grid = np.full((len(kinds), n_layers), np.nan)
    for s, v in auc.items():
        grid[kinds.index(site_kind(s)), layer_of(s)] = v
    fig = heatmap(grid, row_labels=kinds, col_labels=[str(i) for i in range(n_layers)], vmin=0.5, vmax=1.0,
                  title="probe ROC-AUC, memorized vs confident control tokens (held-out documents)",
                  cbar_label="ROC-AUC")
    fig.axes[0].set_xlabel("layer")
    save_figure(fig, path, script="memprobe audit")


def _slug(name: str) -> str:
    return "-".join(name.split())


def _output_digest(path: Path) -> str | None:
    """A digest of a step output as it is now (None: absent), after checking it is whole.

    An activation store counts only when complete and every shard verifies (else MemprobeError),
    and is then known by its manifest, which holds every shard's checksums; a directory is known by
    its files' digests.
    """
    from memprobe.store import MANIFEST, ActivationStore
    from memprobe.store.integrity import file_digest

    if not path.exists():
        return None
    if path.is_file():
        return file_digest(path, "xxh3_128")
    if (path / MANIFEST).is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an incomplete store is reported below, not warned about
            store = ActivationStore.open(path)
        if not store.complete:
            raise MemprobeError(f"{path} is an incomplete activation store; re-run the audit to finish it")
        store.verify()
        return "store:" + file_digest(path / MANIFEST, "xxh3_128")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [[str(p.relative_to(path)), file_digest(p, "xxh3_128")] for p in files]
    return "dir:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _pause_for_test(point: str) -> None:
    """Test hook, inert unless MEMPROBE_TEST_PAUSE_IN names `point`: tests/test_audit_resume.py sets
    it to hold a step here (MEMPROBE_TEST_PAUSE_S seconds, default 60) while it kills the process."""
    if os.environ.get("MEMPROBE_TEST_PAUSE_IN") == point:
        time.sleep(float(os.environ.get("MEMPROBE_TEST_PAUSE_S", "60")))


def _most_memorized(records: list[dict], min_prefix: int) -> tuple[dict, int] | None:
    """The candidate text with the highest memorized fraction, and its first memorized token after min_prefix."""
    ranked = sorted((r for r in records if r.get("role") == "candidate"), key=lambda r: -(r.get("memorized_fraction") or 0))
    for r in ranked:
        for t, m in enumerate(r["memorized"]):
            if m and t >= min_prefix and (r["target_prob"][t] or 0) >= 0.8:
                return r, t
    return None


def _quick_subset(docs: list[dict], per_kind: int) -> list[dict]:
    """A few short documents of every kind: enough to exercise every step in under two minutes."""
    seen: dict[str, int] = {}
    out = []
    for d in sorted(docs, key=lambda d: len(d["text"])):
        k = str(d.get("kind"))
        if seen.get(k, 0) < per_kind:
            seen[k] = seen.get(k, 0) + 1
            out.append(d)
    return out


def default_out(config: AuditConfig) -> Path:
    key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"audit-{Path(config.model).name}-{'quick-' if config.quick else ''}{key}"


def cmd_audit(args: argparse.Namespace) -> int:
    from memprobe.cli import table

    config = AuditConfig(model=args.model, texts=args.texts, quick=args.quick, seed=args.seed)
    out = Path(args.out) if args.out else default_out(config)
    t = time.perf_counter()
    summary = Audit(config, out).run()
    print()
    print(table(summary["by_kind"], ["kind", "docs", "tokens", "memorized_token_rate", "k_extractable_rate",
                                     "mean_memorization_score"]))
    model = summary["model"] or {}
    print(f"\nmodel {model.get('name')} ({model.get('quantization')}); audit in {out} "
          f"({time.perf_counter() - t:.0f} s); results: {out / 'results.json'}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="label, capture and localize memorization; write a report")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", help="JSONL texts {id, text, ...} (default: the bundled corpus)")
    p.add_argument("--out", help="audit directory (default: runs/audit-<model>-<hash>); re-running resumes")
    p.add_argument("--quick", action="store_true", help="a few texts per kind (for tests, < 2 min)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_audit)
