"""One shape for methods: localizer classes equal the functions they replaced; edits round-trip
through the registry; one document validator and one over-length policy; analyses take tensors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memprobe.errors import MemprobeError
from memprobe.intervene import localizers as L
from memprobe.models import load_model

ROOT = Path(__file__).resolve().parents[1]
OLD_LOCALIZERS_COMMIT = "4a17ba7"  # the last commit with the function-per-method module
TEXT = "Permission is hereby granted, free of charge, to any person obtaining a copy"


def _old_localizers(tmp_path: Path):
    """The committed function-based module, loaded from git into a temp module."""
    try:
        source = subprocess.run(
            ["git", "show", f"{OLD_LOCALIZERS_COMMIT}:memprobe/intervene/localizers.py"], cwd=ROOT,
            check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.fail(f"commit {OLD_LOCALIZERS_COMMIT} (the old localizers) is missing: run the tests in a full clone, not a shallow one")
    path = tmp_path / "old_localizers.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_localizers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_localizers"] = module
    spec.loader.exec_module(module)
    return module


def test_each_localizer_equals_the_old_function(tmp_path):
    old = _old_localizers(tmp_path)
    loaded = load_model("tiny-llama")
    model = loaded.model
    ids = loaded.encode(TEXT)
    target = L.Target.suffix(ids, 8)
    old_target = old.Target.suffix(ids, 8)
    background = [L.Target.suffix(loaded.encode("An ordinary sentence about the weather."), 1)]
    old_background = [old.Target(b.token_ids, b.positions) for b in background]
    means = L.mean_activations(model, background)
    cases = {
        "activations": ({}, lambda: old.activations(model, old_target, old_background)),
        "attribution": ({"baseline": means},
                        lambda: old.attribution(model, old_target, means)),
        "integrated_gradients": ({"steps": 3},
                                 lambda: old.integrated_gradients(model, old_target, steps=3)),
        "slimming": ({"steps": 3, "seed": 2},
                     lambda: old.slimming(model, old_target, old_background, steps=3, seed=2)),
        "hard_concrete": ({"steps": 3, "seed": 2},
                          lambda: old.hard_concrete(model, old_target, old_background, steps=3, seed=2)),
        "zero_out": ({"batch": 32}, lambda: old.zero_out(model, old_target, batch=32)),
        "probe_neurons": ({"k": 4}, lambda: old.probe_neurons(model, old_target, old_background, 4)),
        "random": ({"seed": 5}, lambda: old.random_scores(model, 5)),
    }
    assert set(cases) == set(L.LOCALIZERS)
    for name, (params, old_scores) in cases.items():
        result = L.LOCALIZERS[name](model, **params).localize(target, background)
        assert result.method == name and result.n_targets == 1
        expected = old_scores()
        assert torch.equal(result.scores, expected), name
        assert result.scores.abs().sum() > 0, name


def test_localization_result_saves_plots_and_averages_targets(tmp_path):
    import json

    loaded = load_model("tiny-llama")
    targets = [L.Target.suffix(loaded.encode(TEXT), 8),
               L.Target.suffix(loaded.encode("To be, or not to be, that is the question"), 4)]
    attribution = L.Attribution(loaded.model)
    singles = [attribution.localize(t).scores for t in targets]
    both = attribution.localize(targets)
    assert both.n_targets == 2
    assert torch.allclose(both.scores, (singles[0] + singles[1]) / 2)
    saved = json.loads(both.save(tmp_path / "attr.json").read_text())
    assert saved["method"] == "attribution" and saved["shape"] == list(both.scores.shape)
    assert torch.allclose(torch.tensor(saved["scores"]), both.scores)
    assert (tmp_path / "attr.png").exists() is False
    both.plot(tmp_path / "attr.png")
    assert (tmp_path / "attr.png").stat().st_size > 1000
    edit = both.top(k=3)
    assert edit.size == 3
    with pytest.raises(MemprobeError, match="needs at least one target"):
        attribution.localize([])
    with pytest.raises(MemprobeError, match="unknown localizer 'nope'.*activations"):
        L.localizer("nope")


def test_edits_round_trip_through_the_registry(tmp_path):
    from safetensors.torch import save_file

    from memprobe.intervene.ablation import (
        EDIT_KINDS,
        DirectionEdit,
        LowRankEdit,
        NeuronEdit,
        load_edit,
        register_edit,
        save_edit,
    )

    assert set(EDIT_KINDS) == {"neurons", "direction", "low-rank"}
    g = torch.Generator().manual_seed(0)
    edits = [
        NeuronEdit({0: torch.tensor([1, 5]), 2: torch.tensor([3])}, 0.7, {0: torch.tensor([0.1, 0.2]),
                                                                          2: torch.tensor([-1.0])}, {"a": 1}),
        NeuronEdit({1: torch.tensor([4])}, 1.0),
        DirectionEdit(torch.randn(16, generator=g), 0.5, {"method": "x"}),
        LowRankEdit({1: (torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g))}, 0.3),
    ]
    x = torch.randn(3, 8, generator=g)
    for j, edit in enumerate(edits):
        back = load_edit(save_edit(edit, tmp_path / f"e{j}.safetensors"))
        assert type(back) is type(edit) and back.strength == edit.strength and back.meta == edit.meta
        tensors, again = edit.to_tensors(), back.to_tensors()
        assert tensors.keys() == again.keys()
        assert all(torch.equal(tensors[k], again[k]) for k in tensors)
        if isinstance(edit, NeuronEdit):
            assert torch.equal(back.apply(1, x), edit.apply(1, x))
    assert not list(tmp_path.glob("*.tmp"))
    # a kind nobody registered: the error lists the known ones
    save_file({"w": torch.zeros(2)}, str(tmp_path / "odd.safetensors"),
              metadata={"memprobe_edit": '{"kind": "rotation", "strength": 1.0}'})
    with pytest.raises(MemprobeError, match="unknown edit kind 'rotation'.*direction, low-rank, neurons"):
        load_edit(tmp_path / "odd.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(MemprobeError, match="not a readable safetensors edit file"):
        load_edit(tmp_path / "junk.safetensors")
    with pytest.raises(MemprobeError, match="already registered"):
        register_edit("neurons")(type("Other", (), {}))


def test_the_committed_smollm2_edit_still_loads(tmp_path):
    """The edit file as committed before the registry (save_edit's if-chain wrote it) loads through it."""
    from memprobe.intervene.ablation import LowRankEdit, load_edit, save_edit

    try:
        blob = subprocess.run(
            ["git", "show", f"{OLD_LOCALIZERS_COMMIT}:experiments/results/suppress_edit_smollm2.safetensors"],
            cwd=ROOT, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.fail(f"commit {OLD_LOCALIZERS_COMMIT} (the pre-registry edit file) is missing: run the tests in a full clone, not a shallow one")
    path = tmp_path / "old_edit.safetensors"
    path.write_bytes(blob)
    edit = load_edit(path)
    assert isinstance(edit, LowRankEdit) and edit.size > 0 and edit.meta["method"] == "low-rank-edit"
    layer = next(iter(edit.factors))
    a, b = edit.factors[layer]
    assert b.shape[0] == 576 and a.shape[0] == b.shape[1]  # SmolLM2-135M: d_model 576
    assert torch.isfinite(edit.weight_delta(layer)).all() and edit.weight_delta(layer).abs().sum() > 0
    again = load_edit(save_edit(edit, tmp_path / "resaved.safetensors"))
    assert all(torch.equal(again.to_tensors()[k], v) for k, v in edit.to_tensors().items())


def test_one_document_validator_names_file_line_or_id(tmp_path):
    from memprobe.documents import validate_documents
    from memprobe.jsonl import read_jsonl
    from memprobe.lab.finetune import read_train_docs

    bad = [
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "document id 'a' appears twice"),
        ([{"id": "", "text": "x"}], "document 0: 'id' is empty"),
        ([{"id": 3, "text": "x"}], "document 0: missing string field 'id'"),
        ([{"id": "b", "text": "  "}], "document 'b' has empty text"),
        ([{"id": "c"}], "document 'c': missing string field 'text'"),
        (["just text"], "document 0: expected a JSON object"),
    ]
    for docs, message in bad:
        with pytest.raises(MemprobeError, match=message):
            validate_documents(docs)
        with pytest.raises(MemprobeError, match=message.split(":")[-1].strip()):
            read_train_docs(docs)  # the finetune reader uses the same validator
    good = [{"id": "a", "text": "x"}, {"id": "b", "text": "y", "kind": "z"}]
    assert validate_documents(good) == good
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": ""}\n')
    with pytest.raises(MemprobeError, match=r"docs.jsonl:3: document 'b' has empty text"):
        read_jsonl(path)


def test_one_overlength_policy_everywhere(tmp_path):
    from memprobe.capture import tokenize_documents
    from memprobe.documents import encode_documents
    from memprobe.intervene.suppress import build_edit
    from memprobe.jsonl import write_jsonl
    from memprobe.labels import label_documents
    from memprobe.mia.attacks import _encode_all

    loaded = load_model("tiny-llama")
    limit = loaded.context_length
    long_doc = {"id": "long", "text": "x" * (limit + 10)}
    refusal = r"'long' is \d+ tokens, longer than .*context of \d+: refused.*truncate"
    for refuse in (lambda: tokenize_documents(loaded, [long_doc]),
                   lambda: encode_documents(loaded, [long_doc]),
                   lambda: label_documents(loaded, [long_doc]),
                   lambda: _encode_all(loaded, [long_doc])):
        with pytest.raises(MemprobeError, match=refusal):
            refuse()
    # the edit builder used to cut the text silently: it now refuses it as capture does
    write_jsonl(tmp_path / "mem.jsonl", [long_doc])
    write_jsonl(tmp_path / "ctrl.jsonl", [{"id": "c", "text": "An ordinary control sentence."}])
    with pytest.raises(MemprobeError, match=refusal):
        build_edit(loaded, "random-neurons", memorized_jsonl=str(tmp_path / "mem.jsonl"),
                   control_jsonl=str(tmp_path / "ctrl.jsonl"))
    cut = tokenize_documents(loaded, [long_doc, {"id": "short", "text": "abc"}], truncate=True)
    assert len(cut[0].token_ids) == limit and cut[0].fields["truncated_from"] == len(loaded.encode(long_doc["text"]))
    assert cut[0].token_ids == loaded.encode(long_doc["text"])[:limit]
    assert cut[1].token_ids == loaded.encode("abc") and "truncated_from" not in cut[1].fields
    # a token budget below the context follows the same policy
    with pytest.raises(MemprobeError, match=r"'short' is \d+ tokens, longer than max_tokens of 2: refused"):
        tokenize_documents(loaded, [{"id": "short", "text": "abc"}], max_tokens=2)
    budget = tokenize_documents(loaded, [{"id": "short", "text": "abc"}], max_tokens=2, truncate=True)
    assert budget[0].token_ids == loaded.encode("abc")[:2] and budget[0].fields["truncated_from"] == len(loaded.encode("abc"))


def _small_conv():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(1, 3, 3))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("flat", torch.nn.Flatten())
    model.add_module("fc", torch.nn.Linear(3 * 6 * 6, 4))
    return model.eval()


def _noise(x, gen):
    return (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def test_analyses_read_captured_views_and_equal_a_hand_computation():
    from memprobe.capture import augmented_views, capture_augmented, capture_outputs, capture_views
    from memprobe.localize import alignment_distances, stream_unitmem, unit_points, unitmem

    model, x = _small_conv(), torch.rand(7, 1, 8, 8)
    views = list(augmented_views(x, augment=_noise, n_aug=3, batch_size=4, seed=3))
    assert [v.shape[:2] for v in views] == [(4, 4), (4, 3)]
    assert torch.equal(views[0][0], x[:4])  # view 0 is the point itself
    # by hand: the same generator draws, one forward, L2-normalised distance to the original
    gen = torch.Generator().manual_seed(3)
    expected = []
    for i in (0, 4):
        xb = x[i:i + 4]
        with torch.no_grad():
            reps = [model.act(model.conv(v)).flatten(1) for v in [xb] + [_noise(xb, gen) for _ in range(3)]]
        r = [torch.nn.functional.normalize(t, dim=1) for t in reps]
        expected.append(torch.stack([(v - r[0]).norm(dim=1) for v in r[1:]]).mean(0))
    d = alignment_distances(capture_augmented(model, x, ["act"], augment=_noise, n_aug=3, batch_size=4, seed=3))
    torch.testing.assert_close(d["act"], torch.cat(expected).double())
    both = alignment_distances(capture_augmented({"f": model, "g": model}, x, ["act"], augment=_noise, n_aug=3,
                                                 batch_size=4, seed=3))
    assert torch.equal(both["f"]["act"], d["act"]) and torch.equal(both["g"]["act"], d["act"])
    # UnitMem from captured (A, b, units) views equals unitmem on the whole tensor
    caught = capture_views(model, views[0][1:], unit_points(["act"]))["act"]
    assert caught.shape == (3, 4, 3)
    accs = stream_unitmem([{"act": caught}])
    torch.testing.assert_close(accs["act"].compute(), unitmem(caught.transpose(0, 1).double()))
    feats = capture_outputs(model, x, ["fc", "act"], batch_size=3)
    with torch.no_grad():
        assert feats["fc"].shape == (7, 4) and torch.allclose(torch.from_numpy(feats["fc"]), model(x))
    with pytest.raises(MemprobeError, match="no captured views"):
        alignment_distances([])
    index_model = torch.nn.Sequential(torch.nn.Embedding(5, 2))  # 1-D inputs (row indices) are a batch too
    rows = torch.tensor([3, 1, 4])
    with torch.no_grad():
        assert np.allclose(capture_outputs(index_model, rows, ["0"], batch_size=2)["0"], index_model(rows).numpy())
    with pytest.raises(MemprobeError, match="non-empty batch"):
        list(augmented_views(torch.empty(0, 2)))
    with pytest.raises(MemprobeError, match="at least 2 points"):
        stream_unitmem([{"act": caught[:, :1]}])
    with pytest.raises(MemprobeError, match="act"):  # checked before any forward, closest names listed
        capture_augmented(model, x, ["actt"], augment=_noise, n_aug=1)


def test_train_probe_reads_a_store_and_separates_planted_labels(tmp_path):
    from memprobe.capture import capture
    from memprobe.labels import label_documents
    from memprobe.metrics import roc_auc
    from memprobe.probes.artefact import probe_capture_sites, probe_tokens, train_probe
    from memprobe.probes.features import read_rows

    loaded = load_model("tiny-llama")
    docs = [{"id": f"{role}{j}", "role": role, "split_group": f"{role}{j}",
             "text": ("abcabc abcabc abcabc abcabc " if role == "candidate" else "xyz.xyz.xyz.xyz.xyz.xyz. ") * 2}
            for role in ("candidate", "control") for j in range(3)]
    records = label_documents(loaded, docs)
    for r in records:  # plant the labels: every token of a candidate text "memorized", of a control "confident"
        r["memorized"] = [True] * len(r["memorized"])
        r["memorized_fraction"] = 1.0
    tokens = probe_tokens(records)
    site = "blocks.1.hook_resid_post"
    assert probe_capture_sites(site) == site
    store = capture(loaded, docs, site, tmp_path / "store")
    train = np.isin(tokens.doc_id, ["candidate0", "candidate1", "control0", "control1"])
    probe, training = train_probe(store, tokens.subset(train), site=site, window=1)
    assert training["site"] == site and training["documents"] == 4
    held = tokens.subset(~train)  # held-out documents of the same two kinds
    x = read_rows(store, site, held.store_rows(store, -1), window=1, doc_start=held.store_doc_starts(store))
    assert roc_auc(probe.decision_function(x.numpy().astype(np.float64)), held.label) > 0.9
    with pytest.raises(MemprobeError, match="not in the store"):
        other = capture(loaded, docs[:1], site, tmp_path / "small")
        train_probe(other, tokens, site=site, window=1)
    with pytest.raises(MemprobeError, match="memorized tokens and confident control tokens"):
        probe_tokens([r for r in records if r["role"] == "control"])
