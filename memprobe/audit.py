"""`memprobe audit`: from a model and texts to what it memorized, where, and how to suppress it.

Each step writes its outputs into the audit directory, through memprobe.studies.cache.StepCache: a
step is done only when its outputs were verified after it ran and `steps/<step>.done.json` (written
last, atomically) records them under a key of the step's inputs, settings and code (the step and the
study it calls, memprobe.studies.probe_sweep or .suppression); a re-run reuses a step whose record matches and whose
outputs still verify, and re-runs any other: a killed capture resumes shard by shard, anything else
half-written is deleted and made again. So an interrupted audit finishes with the results an
uninterrupted one would have given, and a finished one is not recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from memprobe.errors import MemprobeError
from memprobe.io.atomic import staged_directory
from memprobe.jsonl import read_jsonl, write_jsonl
from memprobe.report import render_report
from memprobe.results import write_json
from memprobe.studies.cache import StepCache

DEFAULT_SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"


@dataclass(frozen=True)
class AuditConfig:
    """What an audit was asked to do; an audit directory holds the audit of one config only.

    The help texts are those of `memprobe audit`, whose options are generated from these fields."""

    model: str = field(default="smollm2-135m", metadata={"help": "registered name or local HF/GGUF path"})
    texts: str | None = field(default=None, metadata={"help": "JSONL texts {id, text, ...} (default: the "
                                                               "bundled corpus)"})
    quick: bool = field(default=False, metadata={"help": "a few texts per kind (for tests, < 2 min)"})
    seed: int = field(default=0, metadata={"help": "seed of the bundled corpus, the splits and the bootstraps"})
    sites: str = field(default=DEFAULT_SITES, metadata={"help": "sites (or globs) to capture and localize"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="bfloat16", metadata={"help": "dtype of the activation capture"})
    min_prob: float = field(default=0.5, metadata={"help": "a memorized token is correct with p >= this"})
    precision: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "compute precision of the forward passes after the texts step: auto = the blocks in bfloat16 "
                "autocast where bfloat16 is native (the vocabulary head float32), else float32 "
                "(memprobe.precision)"})
    # Membership (memprobe.calibration): memorized beyond a reference model (same tokenizer), and a
    # lab directory whose members the audited model was fine-tuned on (its texts replace `texts`).
    reference_model: str | None = field(default=None, metadata={
        "help": "report memorization beyond this model (the audited model's base; same tokenizer): per-text "
                "ref score, per-token log-prob gain, calibrated labels"})
    lab: str | None = field(default=None, metadata={
        "help": "a membership lab directory (memprobe lab build) the model was fine-tuned on: MIA ROC/AUC, "
                "canary exposure and PII extraction against known membership"})


class Audit:
    """Runs the audit steps in order, each cached in `out/` under its own name."""

    def __init__(self, config: AuditConfig, out: str | Path) -> None:
        self.config = config
        self.out = Path(out)
        self._loaded = None
        self._reference = None
        self._claim_directory()
        self.cache = StepCache(self.out)
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

    @property
    def reference(self):
        """The reference model (`--reference-model`), or None."""
        if self._reference is None and self.config.reference_model:
            from memprobe.models import load_model

            self._reference = load_model(self.config.reference_model)
        return self._reference

    def step(self, name: str, output: str, fn: Callable[[Path], Any], *, inputs: Sequence[str | Path] = (),
             also: Sequence[str] = (), resumable: Sequence[str] = (), code: Sequence[Any] = ()) -> Path:
        """Run `fn(out/output)` unless the step is done (memprobe.studies.cache); time it.

        `inputs`: files or directories it reads (audit-relative names or paths), part of its key with
        the audit settings and the source of `fn` and of `code` (the study modules it calls); `also`:
        other outputs it writes (verified and recorded like `output`); `resumable`: outputs a killed
        attempt with the same key leaves for the next one to continue (the activation store).
        """
        path = self.out / output
        key = self.cache.key(name, inputs={str(i): Path(i) for i in inputs}, settings=self.config, code=[fn, *code])
        if self.cache.is_done(name, key):
            print(f"[audit] {name}: reusing {path}")
            return path
        print(f"[audit] {name} ...", flush=True)
        self.cache.run(name, [output, *also], self._in_precision(name, fn), key=key, resumable=resumable)
        self.timings[name] = self.cache.seconds(name) or 0.0
        write_json(self.out / "timings.json", self.timings)  # kept, so a resumed audit reports every step
        return path

    def _in_precision(self, name: str, fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        """fn in the audit's compute precision; the texts step (the model's own samples) always in
        float32, so that the corpus is the same whatever the precision; the suppression step sets its
        own (its edit trains in bfloat16 autocast, head included: memprobe.intervene.weight_edit)."""
        if name in ("texts", "suppression patch") or self.config.precision == "float32":
            return fn

        def run(path: Path) -> Any:
            from memprobe.precision import compute_precision

            models = [self.loaded.model] + ([self.reference.model] if self.config.reference_model else [])
            with compute_precision(self.config.precision, *models):
                return fn(path)

        return run

    # -- steps ------------------------------------------------------------------------------

    def texts(self, path: Path) -> None:
        from memprobe.corpora import bundled_corpus

        # --quick keeps 3 texts per kind, so it samples only the model-sample controls it keeps (2 prompts)
        prompts = 2 if self.config.quick else None
        if self.config.lab:  # all of the lab, even with --quick: membership needs both sides whole
            write_jsonl(path, _lab_documents(self.config.lab))
            return
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
        encoded = encode_documents(self.loaded, docs)  # refuse bad texts with the labeller's messages before capturing
        if self.reference is not None:  # refuse another tokenizer before any forward
            from memprobe.mia.attacks import check_same_tokenizer

            check_same_tokenizer(self.loaded, self.reference, encoded, [d["text"] for d in docs],
                                 [d["id"] for d in docs])
        t = time.perf_counter()
        store = self._capture_store(docs)
        t_capture = time.perf_counter() - t
        records = label_documents(self.loaded, docs, min_prob=self.config.min_prob, store=store, progress=True)
        # The two parts of the label step's time (which includes both): the one forward, and the decode.
        self.timings["capture"] = t_capture
        self.timings["greedy extraction"] = time.perf_counter() - t - t_capture
        for r in records:
            r["model"] = self.loaded.info
        if self.reference is not None:  # one reference forward per batch; the target's came from the capture
            from memprobe.calibration import reference_calibrate
            from memprobe.labels import token_labels

            t = time.perf_counter()
            ref = token_labels(self.reference.model, encoded, min_prob=self.config.min_prob)
            reference_calibrate(records, ref, reference_name=self.reference.name)
            self.timings["reference forward"] = time.perf_counter() - t
        write_jsonl(path, records)

    def _capture_store(self, docs: list[dict[str, Any]]):
        """Activations and per-token statistics of the texts from one forward per batch (resumable)."""
        from memprobe.capture import capture

        light = [{k: d[k] for k in ("id", "text", "kind") if k in d} for d in docs]
        return capture(self.loaded, light, self.config.sites, self.out / "store", dtype=self.config.dtype,
                       token_stats=True)

    def membership(self, path: Path) -> None:
        """What the model knows beyond predictable, per text: the `ref` score with a reference model,
        else the calibration chosen on a lab (memprobe.calibration); all from the label step's
        forward (and the reference's). With --lab, the attacks against known membership, canary
        exposure and PII extraction, through memprobe.mia."""
        from memprobe.calibration import add_reference_scores, default_calibration, ranking
        from memprobe.calibration import text_scores_from_store as scores_from_store
        from memprobe.mia.attacks import MIN_SCORED_TOKENS
        from memprobe.store import ActivationStore

        docs = read_jsonl(self.out / "texts.jsonl")
        records = read_jsonl(self.out / "labels.jsonl")
        scored = [d for d, r in zip(docs, records, strict=True) if r["n_tokens"] - 1 >= MIN_SCORED_TOKENS]
        scores = scores_from_store(ActivationStore.open(self.out / "store"), scored, k=MIA_K)
        if self.reference is not None:
            add_reference_scores(scores, records)
            calibration = {"score": "ref", "reference_model": self.reference.info,
                           "token_rule": REFERENCE_TOKEN_RULE.format(p=self.config.min_prob)}
        else:
            calibration = {k: v for k, v in default_calibration().items() if k != "provenance"}
        result = {"status": "ok", "calibration": calibration, "k": MIA_K,
                  "too_short": [d["id"] for d in docs if d not in scored], "scores": scores,
                  "ranking": ranking(scores, records, calibration["score"])}
        if self.config.lab:
            result["lab"] = lab_measures(self.loaded, docs, scores, lab_settings(self.config),
                                         figure=self.out / "figures" / "mia_roc.png")
        _pause_for_test("membership")
        write_json(path, result)

    def probes(self, path: Path) -> None:
        """One probe per captured site, cross-validated by document family; AUC beside baselines."""
        from memprobe.memdata import build_token_set
        from memprobe.store import ActivationStore
        from memprobe.studies.probe_sweep import run_probe_sweep

        tokens = build_token_set(read_jsonl(self.out / "labels.jsonl"))
        result = run_probe_sweep(ActivationStore.open(self.out / "store"), tokens, audit_probe_config(self.config))
        if result.status == "ok":
            result.plot(self.out / "figures" / "probe_auc.png", script="memprobe audit")
        result.save(path)

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
        result.plot(self.out / "figures" / "patching.png", title=f"activation patching: {record['id']}",
                    script="memprobe audit")

    def suppress(self, path: Path) -> None:
        """Learn a suppression edit on half the memorized texts; choose its strength on a validation
        half of the others and report it on the test half, every control kind counted."""
        from memprobe.intervene.ablation import save_edit
        from memprobe.intervene.suppress import split_memorized
        from memprobe.studies.suppression import SuppressionConfig, run_suppression

        # control_max=1.0: every control (code, formulaic, model samples too) trains and judges the edit.
        # Two fifths of the groups build it; the held-out rest is halved into validation and test.
        parts = split_memorized(read_jsonl(self.out / "labels.jsonl"), seed=self.config.seed, control_max=1.0,
                                build_share=0.4)
        sizes = {k: len(v) for k, v in parts.items()}
        reason = ("too few memorized texts (memorized fraction >= 0.5) and controls to build a patch, choose its "
                  "strength on some texts it was not built from and test it on others")
        if not parts["build_memorized"] or not parts["heldout_memorized"] or not parts["build_control"]:
            write_json(path, {"status": "skipped", "reason": reason, "split_sizes": sizes})
            return
        try:
            result = run_suppression(self.loaded.model, parts["build_memorized"], parts["build_control"],
                                     parts["heldout_memorized"], parts["heldout_control"],
                                     SuppressionConfig(seed=self.config.seed, max_controls=MAX_TRAIN_CONTROLS),
                                     precision=self.config.precision)
        except MemprobeError as exc:
            write_json(path, {"status": "skipped", "reason": f"{reason}: {exc}", "split_sizes": sizes})
            return
        save_edit(result.chosen_edit, self.out / "edit.safetensors")  # the export step bakes it into patched-model/
        write_json(path, {"status": "ok", **result.to_dict(), "heldout_split_sizes": sizes,
                          "heldout_ids": [r["id"] for r in parts["heldout_memorized"]],
                          "patched_model": str((self.out / "patched-model").resolve())})
        result.plot(self.out / "figures" / "suppression.png", script="memprobe audit")

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
        from memprobe.precision import compute_precision

        with compute_precision(self.config.precision, patched.model):  # its head in float32 too
            after = sequence_labels(patched.model, [r["token_ids"] for r in top])
        rows = []
        for r, a in zip(top, after, strict=True):
            rows.append({"id": r["id"], "prefix": self.loaded.decode(r["token_ids"][:32]),
                         "true_suffix": self.loaded.decode(r["token_ids"][32:64]),
                         "before": r["continuation_text"], "score_before": r["memorization_score"],
                         "after": patched.decode(a.continuation.tolist()), "score_after": a.memorization_score})
        write_json(path, {"status": "ok", "continuations": rows})

    def run(self) -> dict[str, Any]:
        from memprobe import calibration
        from memprobe import report as report_module
        from memprobe.studies import probe_sweep as probe_sweep_study
        from memprobe.studies import suppression as suppression_study

        self.out.mkdir(parents=True, exist_ok=True)
        user_texts = [Path(self.config.texts).absolute()] if self.config.texts else []
        if self.config.lab:  # its files, not the directory (a directory with a manifest reads as a store)
            from memprobe.lab.corpus import FILES

            user_texts += [Path(self.config.lab).absolute() / f for f in FILES]
        self.step("texts", "texts.jsonl", self.texts, inputs=user_texts)
        # The label step captures the store on its way (one forward feeds labels, MIA statistics and
        # activations), so the store is one of its outputs; a killed one resumes it shard by shard.
        self.step("label", "labels.jsonl", self.label, inputs=["texts.jsonl"], also=["store"], resumable=["store"])
        choice = [] if self.config.reference_model else [calibration.DEFAULT_CHOICE]  # what it reads
        self.step("membership", "membership.json", self.membership,
                  inputs=["texts.jsonl", "labels.jsonl", "store", *choice],
                  also=["figures/mia_roc.png"] if self.config.lab else [], code=[calibration, lab_measures, lab_settings])
        self.step("probe sweep", "probes.json", self.probes, inputs=["labels.jsonl", "store"],
                  also=["figures/probe_auc.png"], code=[probe_sweep_study])
        self.step("activation patching", "patching.json", self.patching, inputs=["labels.jsonl"],
                  also=["figures/patching.png"])
        self.step("suppression patch", "suppression.json", self.suppress, inputs=["labels.jsonl"],
                  also=["edit.safetensors", "figures/suppression.png"], code=[suppression_study])
        self.step("export patched model", "patched-model", self.export, inputs=["edit.safetensors"])
        self.step("re-label with the patch", "relabel.json", self.relabel, inputs=["labels.jsonl", "patched-model"])
        summary = self.summary()
        self.step("report", "report.html", lambda p: render_report(self.out, p),
                  inputs=["labels.jsonl", "membership.json", "probes.json", "patching.json", "suppression.json",
                          "relabel.json", "figures"], code=[report_module])
        return summary

    def summary(self) -> dict[str, Any]:
        from memprobe.labels import summarize

        records = read_jsonl(self.out / "labels.jsonl")
        summary = {"model": records[0]["model"] if records else None, "config": asdict(self.config),
                   "by_kind": summarize(records), "timings_s": self.timings}
        for name in ("membership", "probes", "patching", "suppression", "relabel"):
            f = self.out / f"{name}.json"
            if f.exists():
                summary[name] = json.loads(f.read_text())
        write_json(self.out / "results.json", summary)
        return summary


MAX_TRAIN_CONTROLS = 16  # control texts the suppression edit is trained against (CPU budget)
MIA_K = 0.2  # min-k% and min-k%++: the lowest 20% of tokens (memprobe.mia.attacks' default)
REFERENCE_TOKEN_RULE = ("memorized = the audited model predicts the token greedily with p >= {p} and the "
                        "reference does not (greedy with p >= {p})")


def lab_settings(config: AuditConfig) -> dict[str, Any]:
    """How the lab measures are taken: the exposure and extraction protocols and the bootstrap."""
    return {"n_boot": 200 if config.quick else 1000, "seed": config.seed,
            # digits:6 has 10^6 candidates: exact (pruned digit tree) when the walk is affordable
            "exposure": {"method": "skewnorm" if config.quick else "auto", "n_samples": 500, "seed": config.seed},
            "extraction": {"prompt_tokens": 64, "n_samples": 8, "margin": 8, "seed": config.seed}}


def lab_measures(loaded: Any, docs: list[dict], scores: list[dict], settings: dict[str, Any], *,
                 figure: Path | None = None) -> dict[str, Any]:
    """memprobe.mia on a lab: every attack's AUC / TPR@1%FPR per copies, canary exposure per copies,
    PII extraction (TER/SER per type and recurrence); SER's seen ids from the fine-tune's record."""
    from memprobe.mia import evaluate_mia, extraction_rates, pii_extraction
    from memprobe.mia.exposure import exposure_report

    membership = {d["id"]: bool(d["member"]) for d in docs}
    copies = {d["id"]: d.get("copies") for d in docs}
    mia = evaluate_mia(scores, membership, copies=copies, n_boot=settings["n_boot"], seed=settings["seed"],
                       figure=figure)
    mia.pop("figure", None)  # an absolute path: the figure is the step's own output
    exposure = exposure_report(loaded, docs, **settings["exposure"])
    seen = _seen_ids(loaded)
    pii = pii_extraction(loaded, [d for d in docs if d.get("pii_spans")], seen_ids=seen,
                         **settings["extraction"])
    occurrences = pii.pop("occurrences")
    pii["by_type"] = {t: extraction_rates([o for o in occurrences if o["type"] == t], seen)
                      for t in sorted({o["type"] for o in occurrences})}
    return {"settings": settings, "mia": mia, "exposure": exposure, "pii_extraction": pii}


def _seen_ids(loaded: Any) -> list[str] | None:
    """Ids of the documents the fine-tune saw (memprobe.lab.finetune's record), None if unrecorded."""
    record = Path(str(loaded.info.get("path") or "")) / "memprobe-finetune.json"
    if not record.is_file():
        return None
    seen = json.loads(record.read_text(encoding="utf-8")).get("seen_total") or {}
    return sorted(i for i, n in seen.items() if n)


def audit_probe_config(config: AuditConfig):  # noqa: ANN201 - memprobe.studies.probe_sweep.ProbeSweepConfig
    """The audit's screening sweep: at most 3 folds, a short L-BFGS budget and scikit-learn's stopping
    tolerance (1e-4) keep it within minutes on a CPU (experiments/probe_layers.py runs the full 5-fold
    evaluation at 1e-6); top neurons at the best MLP site."""
    from memprobe.probes.artefact import DEFAULT_WINDOW
    from memprobe.studies.probe_sweep import ProbeSweepConfig

    return ProbeSweepConfig(window=DEFAULT_WINDOW, n_folds=3, seed=config.seed, max_iter=60, tol=1e-4, n_shuffled=1,
                            n_boot=0 if config.quick else 100, top_neurons=15, top_neurons_at="best_mlp")


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


def _lab_documents(lab_dir: str) -> list[dict]:
    """A lab's members (candidates: the texts trained on) and non-members (controls), membership kept."""
    from memprobe.lab import load_lab

    members, nonmembers, _ = load_lab(lab_dir)
    return [{"role": "candidate" if d["member"] else "control", "split_group": d["id"], **d}
            for d in members + nonmembers]


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
