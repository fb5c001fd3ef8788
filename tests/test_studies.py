"""memprobe.studies: the content-keyed step cache, the shared probe-sweep and suppression studies, and
`memprobe probe train --site auto` (site chosen by grouped CV inside the training data)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from memorize import memorize, save

import memprobe
from memprobe.errors import MemprobeError
from memprobe.memdata import CONTROL, MEMORIZED, TokenSet, build_token_set
from memprobe.results import _plain
from memprobe.studies.cache import StepCache
from memprobe.studies.probe_sweep import ProbeSweepConfig, TensorStore, run_probe_sweep

ROOT = Path(__file__).resolve().parents[1]


# -- the step cache ---------------------------------------------------------------------------


def _writer(calls: list, text: str = "whole output\n"):
    def write(path: Path) -> None:
        calls.append(path)
        path.write_text(text)

    return write


def _other_writer(calls: list):
    def write(path: Path) -> None:  # same effect, other source: another code version
        calls.append(("other", path))
        path.write_text("whole output\n")

    return write


def test_same_key_reuses_and_any_changed_part_reruns(tmp_path, monkeypatch):
    cache = StepCache(tmp_path)
    data = tmp_path / "input.txt"
    data.write_text("first")
    calls: list = []
    fn = _writer(calls)
    parts = {
        "inputs": {"data": Path("input.txt"), "docs": [("a", "text a")]},
        "settings": {"alpha": 0.1},
        "code": [fn],
    }
    assert cache.run("step", ["out.txt"], fn, **parts) is False
    assert cache.run("step", ["out.txt"], fn, **parts) is True and len(calls) == 1

    assert (
        cache.run("step", ["out.txt"], fn, **{**parts, "settings": {"alpha": 0.2}}) is False
    )  # a setting
    assert len(calls) == 2
    data.write_text("second")  # an input file's content
    assert cache.run("step", ["out.txt"], fn, **{**parts, "settings": {"alpha": 0.2}}) is False
    assert len(calls) == 3
    docs = {**parts["inputs"], "docs": [("a", "text A")]}  # a document's text
    assert cache.run("step", ["out.txt"], fn, **{**parts, "inputs": docs}) is False
    other = _other_writer(calls)  # the step's code
    assert (
        cache.run("step", ["out.txt"], other, **{**parts, "inputs": docs, "code": [other]}) is False
    )
    assert calls[-1][0] == "other"
    monkeypatch.setattr(memprobe, "__version__", "99.0")  # memprobe's version
    assert (
        cache.run("step", ["out.txt"], other, **{**parts, "inputs": docs, "code": [other]}) is False
    )
    assert len(calls) == 6
    assert (
        cache.run("step", ["out.txt"], other, **{**parts, "inputs": docs, "code": [other]}) is True
    )


def test_a_half_written_or_changed_output_is_never_reused(tmp_path):
    cache = StepCache(tmp_path)
    calls: list = []

    def crash(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        cache.run("step", ["out.txt"], crash, code=[_writer])
    assert (
        cache.run("step", ["out.txt"], _writer(calls), code=[_writer]) is False and len(calls) == 1
    )
    assert (tmp_path / "out.txt").read_text() == "whole output\n"
    (tmp_path / "out.txt").write_text("whole outp")  # damaged after it was recorded
    assert (
        cache.run("step", ["out.txt"], _writer(calls), code=[_writer]) is False and len(calls) == 2
    )
    (tmp_path / "out.txt").unlink()  # vanished
    assert (
        cache.run("step", ["out.txt"], _writer(calls), code=[_writer]) is False and len(calls) == 3
    )
    assert cache.json("value", lambda: {"x": [1, 2]}) == {"x": [1, 2]}
    assert cache.json("value", lambda: pytest.fail("recomputed a cached value")) == {"x": [1, 2]}


def test_a_step_killed_mid_output_reruns(tmp_path):
    """SIGKILL a real process while its step's output is half written; the next run redoes it."""
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom memprobe.studies.cache import StepCache\n"
        "def slow(path):\n    path.write_text('half')\n    Path(sys.argv[1], 'started').write_text('')\n"
        "    time.sleep(60)\n"
        "StepCache(sys.argv[1]).run('slow step', ['out.txt'], slow, settings={'n': 1})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert (tmp_path / "out.txt").read_text() == "half"
    calls: list = []
    cache = StepCache(tmp_path)
    key = cache.key("slow step", settings={"n": 1}, code=[])
    assert not cache.is_done("slow step", key)
    assert cache.run("slow step", ["out.txt"], _writer(calls), key=key) is False and len(calls) == 1
    assert (tmp_path / "out.txt").read_text() == "whole output\n" and cache.is_done(
        "slow step", key
    )


# -- the probe sweep on tensors, and --site auto's choice -----------------------------------------


def _planted(
    n_docs: int = 24, n_tokens: int = 12, width: int = 8, planted: str = "blocks.1.hook_resid_post"
):
    """A TensorStore of three sites where only `planted` carries the memorized/control label, and its tokens."""
    rng = np.random.default_rng(0)
    doc_ids = [f"d{i}" for i in range(n_docs) for _ in range(n_tokens)]
    memorized = np.array([i % 2 == 0 for i in range(n_docs) for _ in range(n_tokens)])
    acts = {
        s: torch.as_tensor(rng.normal(size=(len(doc_ids), width)), dtype=torch.float32)
        for s in (
            "blocks.0.hook_resid_post",
            "blocks.1.hook_resid_post",
            "blocks.2.hook_resid_post",
        )
    }
    acts[planted][:, 0] += torch.as_tensor(2.0 * memorized, dtype=torch.float32)
    store = TensorStore(acts, doc_ids)
    positions = np.tile(np.arange(1, n_tokens), n_docs)
    docs = np.repeat([f"d{i}" for i in range(n_docs)], n_tokens - 1)
    is_mem = np.repeat([i % 2 == 0 for i in range(n_docs)], n_tokens - 1)
    noise = rng.uniform(size=(4, len(docs)))
    tokens = TokenSet(
        doc_id=docs.astype(str),
        position=positions.astype(np.int64),
        token_id=np.zeros(len(docs), dtype=np.int64),
        category=np.where(is_mem, MEMORIZED, CONTROL).astype(str),
        group=docs.astype(str),
        kind=np.where(is_mem, "famous", "fresh").astype(str),
        genre=np.full(len(docs), "x").astype(str),
        target_prob=noise[0],
        loss=noise[1],
        entropy=noise[2],
        top_prob=noise[3],
    )
    return store, tokens


def test_site_auto_picks_the_site_the_signal_lives_in():
    from memprobe.probes.artefact import select_site

    for planted in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
        store, tokens = _planted(planted=planted)
        site, how = select_site(store, tokens, "blocks.*.hook_resid_post", window=4, n_folds=3)
        assert site == planted
        assert how["cv_auc_inner"] > 0.9 and how["cv_auc_inner"] == how["auc_per_site"][planted]
        assert max(v for s, v in how["auc_per_site"].items() if s != planted) < 0.8


def test_probe_sweep_result_and_its_cache(tmp_path, monkeypatch):
    store, tokens = _planted()
    config = ProbeSweepConfig(window=4, n_folds=3, n_boot=20, top_neurons=3)
    cache = StepCache(tmp_path)
    result = run_probe_sweep(store, tokens, config, cache=cache, progress=False)
    out = result.to_dict()
    assert out["best_site"] == "blocks.1.hook_resid_post" and out["n_folds"] == 3
    best = out["per_site"]["blocks.1.hook_resid_post"]
    assert (
        best["probe"]["roc_auc_ci95"][0] <= best["probe"]["roc_auc"]
        and best["shuffled_labels_auc"] < 0.8
    )
    assert result.top_neurons[0]["neuron"] == "blocks.1.hook_resid_post[0]"
    assert json.loads(result.save(tmp_path / "r.json").read_text()) == json.loads(
        json.dumps(_plain(out))
    )
    assert (result.plot(tmp_path / "r.png")) is not None and (
        tmp_path / "r.png"
    ).stat().st_size > 1000

    from memprobe.probes.sweep import ProbeSweep

    def no_refit(*args, **kwargs):
        raise AssertionError("the cached cross-validation was recomputed")

    monkeypatch.setattr(ProbeSweep, "cross_validate", no_refit)
    again = run_probe_sweep(store, tokens, config, cache=cache, progress=False)
    assert json.dumps(_plain(again.to_dict())) == json.dumps(_plain(out))
    with pytest.raises(AssertionError, match="recomputed"):  # another setting is another key
        run_probe_sweep(
            store, tokens, dataclasses.replace(config, alpha=0.1), cache=cache, progress=False
        )
    few = tokens.subset(np.isin(tokens.doc_id, ["d0", "d1", "d3"]))
    assert run_probe_sweep(store, few, config).to_dict()["status"] == "skipped"


# -- the audit and the experiments call the same studies ------------------------------------------

TEXTS = [
    "The owl and the pussy-cat went to sea in a beautiful pea-green boat.",
    "Permission to copy this sentence verbatim is granted to every reader.",
    "Seven silver swans swam swiftly south across the silent lake at dawn.",
    "Under the old bridge the river keeps its own slow and patient time.",
    "Tomorrow the committee will review the budget and publish its notes.",
    "Bring a coat, since the forecast promises wind and a little rain.",
    "The museum opens at ten and closes early on public holidays.",
    "Trains to the coast leave every hour from the second platform.",
]


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory):
    """An audit directory of tiny-llama with labels (every candidate token counted memorized) and a store."""
    from memprobe.audit import DEFAULT_SITES, Audit, AuditConfig
    from memprobe.capture import capture
    from memprobe.jsonl import write_jsonl
    from memprobe.labels import label_documents
    from memprobe.models import load_model

    loaded = load_model("tiny-llama")
    docs = [
        {"id": f"t{i}", "text": t, "kind": "k", "role": "candidate" if i < 4 else "control"}
        for i, t in enumerate(TEXTS)
    ]
    records = label_documents(loaded, docs)
    for r in (
        records
    ):  # a random model memorizes nothing: plant the labels (as probe_layers --quick does)
        mem = r["role"] == "candidate"
        r["memorized"] = [False] + [True] * (r["n_tokens"] - 1)
        r["memorized_fraction"] = 1.0 if mem else 0.0
        r["split_group"] = r["id"]
    out = tmp_path_factory.mktemp("audit") / "a"
    audit = Audit(AuditConfig(model="tiny-llama", quick=True), out)
    write_jsonl(out / "labels.jsonl", records)
    capture(
        loaded,
        docs,
        DEFAULT_SITES,
        out / "store",
        dtype="bfloat16",
        token_stats=True,
        progress=False,
    )
    return audit, records


def test_audit_probe_step_and_probe_layers_run_one_study(audit_dir):
    from memprobe.audit import audit_probe_config
    from memprobe.store import ActivationStore

    audit, records = audit_dir
    audit.probes(audit.out / "probes.json")
    from_audit = json.loads((audit.out / "probes.json").read_text())
    store, tokens = ActivationStore.open(audit.out / "store"), build_token_set(records)
    direct = run_probe_sweep(
        store, tokens, audit_probe_config(audit.config), progress=False
    ).to_dict()
    assert from_audit["status"] == "ok" and from_audit == json.loads(json.dumps(_plain(direct)))

    spec = importlib.util.spec_from_file_location(
        "probe_layers_experiment", ROOT / "experiments" / "probe_layers.py"
    )
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    config = experiment.study_config(
        argparse.Namespace(
            window=audit_probe_config(audit.config).window, seed=0, quick=False, n_boot=0
        )
    )
    # The experiment's config with the audit's screening budget gives the audit's result, key for key.
    same = dataclasses.replace(
        config,
        **{
            f.name: getattr(audit_probe_config(audit.config), f.name)
            for f in dataclasses.fields(config)
            if f.name in ("n_folds", "max_iter", "tol", "top_neurons", "top_neurons_at")
        },
    )
    assert same == audit_probe_config(audit.config)
    assert (
        json.loads(
            json.dumps(_plain(run_probe_sweep(store, tokens, same, progress=False).to_dict()))
        )
        == from_audit
    )


def test_audit_suppress_step_is_the_suppression_study(audit_dir):
    from memprobe.audit import MAX_TRAIN_CONTROLS
    from memprobe.intervene.suppress import split_memorized
    from memprobe.models import load_model
    from memprobe.studies.suppression import SuppressionConfig, run_suppression

    audit, records = audit_dir
    audit.suppress(audit.out / "suppression.json")
    from_audit = json.loads((audit.out / "suppression.json").read_text())
    assert from_audit["status"] == "ok" and (audit.out / "edit.safetensors").exists()
    parts = split_memorized(records, seed=0)
    study = run_suppression(
        load_model("tiny-llama").model,
        parts["build_memorized"],
        parts["build_control"],
        parts["heldout_memorized"],
        parts["heldout_control"],
        SuppressionConfig(seed=0, max_controls=MAX_TRAIN_CONTROLS),
        precision=audit.config.precision,
    )
    for key, value in json.loads(json.dumps(_plain(study.to_dict()))).items():
        assert from_audit[key] == value, key
    assert [r["strength"] for r in from_audit["curve"]] == list(SuppressionConfig().strengths)


def test_run_suppression_refuses_missing_parts():
    from memprobe.studies.suppression import SuppressionConfig, run_suppression

    with pytest.raises(MemprobeError, match="memorized texts to build from"):
        run_suppression(torch.nn.Linear(1, 1), [], [], [], [], SuppressionConfig())


# -- memprobe probe train --site auto on a model that memorized ----------------------------------------


def test_probe_train_site_auto_cli(tmp_path):
    from memprobe.models import load_model

    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    memorize(loaded, TEXTS[:4], 200)
    save(loaded, tmp_path / "model")
    data = tmp_path / "texts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "text": t, "role": "candidate" if i < 4 else "control"})
            + "\n"
            for i, t in enumerate(TEXTS)
        )
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "memprobe.cli",
            "probe",
            "train",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(data),
            "--site",
            "auto",
            "--folds",
            "2",
            "--window",
            "4",
            "--directions",
            "--dtype",
            "bfloat16",
            "--out",
            str(tmp_path / "probe"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    config = json.loads((tmp_path / "probe" / "probe.json").read_text())
    how = config["training"]["site_selection"]
    assert set(how["auc_per_site"]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert config["site"] == max(how["auc_per_site"], key=how["auc_per_site"].get)
    assert (
        how["cv_auc_inner"] == how["auc_per_site"][config["site"]]
        and "inside the training data" in how["method"]
    )
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "probe" / "directions.safetensors")) == set(how["auc_per_site"])
