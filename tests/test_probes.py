"""Probes: sklearn contract, agreement with sklearn's LogisticRegression, batched == separate fits,
top-k neuron recovery, the sweep against per-fold estimators, the artefact, scoring and the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from memprobe.capture import capture
from memprobe.cli import main
from memprobe.metrics import roc_auc
from memprobe.models import load_model
from memprobe.probes import (
    LogisticProbe,
    ProbeSweep,
    TopKProbe,
    document_bootstrap,
    fit_logistic_batch,
    load_probe,
    read_rows,
    save_probe,
    score_documents,
)


def blobs(n: int = 300, d: int = 12, informative: tuple[int, ...] = (3, 7), seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    y = (X[:, list(informative)] @ np.array([1.5, -2.0][: len(informative)]) + rng.normal(size=n) > 0).astype(int)
    return X, y


@pytest.mark.parametrize("estimator", [LogisticProbe(), TopKProbe(k=2)], ids=["dense", "topk"])
def test_sklearn_estimator_contract(estimator):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed


def test_matches_sklearn_logistic_regression():
    X, y = blobs()
    alpha = 0.05
    ours = LogisticProbe(alpha=alpha, tol=1e-9).fit(X, y)
    Z = StandardScaler().fit_transform(X)  # our penalty is on standardised weights
    ref = LogisticRegression(C=1 / (alpha * len(y)), tol=1e-10, max_iter=5000).fit(Z, y)
    np.testing.assert_allclose(ours.standardized_coef_, ref.coef_[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.decision_function(X), ref.decision_function(Z), rtol=1e-4, atol=1e-4)
    assert ours.predict_proba(X)[:, 1] == pytest.approx(ref.predict_proba(Z)[:, 1], abs=1e-5)


def test_batched_fit_equals_separate_fits_and_zero_weight_drops_rows():
    X1, y = blobs(seed=1)
    X2, _ = blobs(seed=2)
    X = torch.tensor(np.stack([X1, X2]))
    keep = np.arange(len(y)) % 3 != 0
    Y = torch.tensor(np.stack([y, 1 - y]), dtype=torch.float64)
    W = torch.tensor(np.stack([np.ones(len(y)), keep.astype(float)]))
    batch = fit_logistic_batch(X, Y, W, alpha=torch.tensor([0.01, 0.1]), tol=1e-10, max_iter=500)
    for s, Xs in enumerate((X1, X2)):
        for p, (target, rows, alpha) in enumerate([(y, np.ones(len(y), bool), 0.01), (1 - y, keep, 0.1)]):
            single = LogisticProbe(alpha=alpha, tol=1e-10, max_iter=500).fit(Xs[rows], target[rows])
            np.testing.assert_allclose(batch.coef[s, p].numpy(), single.coef_[0], rtol=1e-3, atol=1e-5)
            assert float(batch.intercept[s, p]) == pytest.approx(float(single.intercept_[0]), abs=1e-4)


def test_topk_probe_names_the_informative_neurons():
    X, y = blobs(n=600, d=40, informative=(3, 7))
    probe = TopKProbe(k=2).fit(X, y)
    assert set(probe.neurons_.tolist()) == {3, 7}
    assert np.count_nonzero(probe.coef_) == 2
    assert roc_auc(probe.decision_function(X), y) > 0.9
    assert len(TopKProbe(k=100).fit(X, y).neurons_) == 40


def test_document_bootstrap_resamples_documents():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=60) + np.repeat([0, 1], 30), np.repeat([0, 1], 30)
    docs = np.arange(60).astype(str)
    one = document_bootstrap(scores, labels, docs, n_boot=100, seed=0)
    # ten identical tokens per document: the same documents, so exactly the same interval
    ten = document_bootstrap(np.repeat(scores, 10), np.repeat(labels, 10), np.repeat(docs, 10), n_boot=100, seed=0)
    assert one == ten
    lo, hi = one["roc_auc"]
    assert lo < roc_auc(scores, labels) < hi
    perfect = document_bootstrap(labels.astype(float), labels, docs, n_boot=50)
    assert perfect["roc_auc"] == [1.0, 1.0]


TEXTS = [{"id": f"d{i}", "text": t} for i, t in enumerate([
    "the quick brown fox jumps over the lazy dog", "lorem ipsum dolor sit amet, consectetur",
    "to be or not to be, that is the question", "import numpy as np\nimport torch",
    "four score and seven years ago our fathers", "once upon a time there was a small cat",
])]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    loaded = load_model("tiny-llama")
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    store = capture(loaded, TEXTS, sites, tmp_path_factory.mktemp("store"), progress=False)
    return loaded, store


def test_sweep_cross_validation_matches_per_fold_probes(tiny_store):
    _, store = tiny_store
    rows = np.arange(len(store))
    y = (store.rows.token_id.numpy() % 2).astype(int)  # a label the features can partly decode
    folds = store.rows.doc_index.numpy() % 3
    sweep = ProbeSweep(alpha=0.1, tol=1e-9, max_iter=500, progress=False)
    cv = sweep.cross_validate(store, rows, y, folds, n_shuffled=1)
    oof, shuffled = cv.oof, cv.shuffled
    assert set(oof) == set(store.sites) and cv.n_folds == 3
    assert cv.to_dict()["auc"] == {s: cv.auc(s) for s in store.sites}
    for site in store.sites:
        X = read_rows(store, site, rows).double().numpy()
        expect = np.empty(len(y))
        for f in range(3):
            probe = LogisticProbe(alpha=0.1, tol=1e-9, max_iter=500, class_weight="balanced")
            probe.fit(X[folds != f], y[folds != f])
            expect[folds == f] = probe.decision_function(X[folds == f])
        np.testing.assert_allclose(oof[site], expect, rtol=2e-2, atol=2e-3)
        assert not np.allclose(shuffled[site], oof[site])
    fitted = sweep.fit(store, rows, y, sites=store.sites[:1])
    assert fitted[store.sites[0]].predict(read_rows(store, store.sites[0], rows).numpy()).shape == y.shape


def test_artefact_round_trip_and_scores_use_the_previous_position(tiny_store, tmp_path):
    loaded, store = tiny_store
    site = "blocks.1.hook_resid_post"
    X = read_rows(store, site, np.arange(len(store))).double().numpy()
    y = (store.rows.token_id.numpy() % 2).astype(int)
    probe = LogisticProbe(alpha=0.1).fit(X, y)
    save_probe(tmp_path / "p", probe, site=site, model_info=loaded.info, training={"note": "test"})
    loaded_probe, config = load_probe(tmp_path / "p")
    np.testing.assert_allclose(loaded_probe.decision_function(X), probe.decision_function(X), rtol=1e-4, atol=1e-4)
    records = score_documents(loaded, TEXTS, loaded_probe, config)
    for rec in records:
        rows = store.doc_rows(rec["id"])
        assert rec["token_ids"] == store.rows.token_id[rows].tolist()
        assert rec["scores"][0] is None and len(rec["scores"]) == len(rec["token_ids"])
        expect = loaded_probe.predict_proba(X[rows][:-1])[:, 1]
        np.testing.assert_allclose(rec["scores"][1:], expect, atol=1e-4)


def test_windowed_features_stay_in_their_text_and_match_the_scoring_path(tiny_store, tmp_path):
    """read_rows(window=w) (training) and window_mean (scoring) give the same feature; windows stop at the
    start of their text; a saved windowed probe scores with its window."""
    from memprobe.errors import MemprobeError
    from memprobe.probes import window_mean

    loaded, store = tiny_store
    site, w = "blocks.1.hook_resid_post", 3
    starts = np.array([store.doc_rows(t["id"]).start for t in TEXTS])
    rows = np.arange(len(store))
    ordered = np.sort(starts)
    doc_start = ordered[np.searchsorted(ordered, rows, side="right") - 1]
    feats = read_rows(store, site, rows, window=w, doc_start=doc_start)
    plain = read_rows(store, site, rows)
    for text, start in zip(TEXTS, starts, strict=True):
        r = store.doc_rows(text["id"])
        seq = plain[r]
        torch.testing.assert_close(feats[r], window_mean(seq[None], w)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats[start], seq[0])  # first token: nothing before it in the text
        torch.testing.assert_close(feats[start + 4], seq[2:5].mean(0), atol=1e-6, rtol=1e-6)
    with pytest.raises(MemprobeError, match="needs doc_start"):
        read_rows(store, site, rows, window=w)
    with pytest.raises(MemprobeError, match="positive integer"):
        read_rows(store, site, rows, window=0)
    y = (store.rows.token_id.numpy() % 2).astype(int)
    probe = LogisticProbe(alpha=0.1).fit(feats.double().numpy(), y)
    save_probe(tmp_path / "p", probe, site=site, model_info=loaded.info, training={}, window=w)
    loaded_probe, config = load_probe(tmp_path / "p")
    assert config["window"] == w
    records = score_documents(loaded, TEXTS, loaded_probe, config)
    for rec in records:
        r = store.doc_rows(rec["id"])
        expect = loaded_probe.predict_proba(feats[r][:-1].double().numpy())[:, 1]
        np.testing.assert_allclose(rec["scores"][1:], expect, atol=1e-4)
    sweep = ProbeSweep(alpha=0.1, max_iter=50, progress=False, window=w)
    with pytest.raises(MemprobeError, match="needs doc_start"):
        sweep.fit(store, rows, y, sites=[site])
    fitted = sweep.fit(store, rows, y, sites=[site], doc_start=doc_start)[site]
    assert fitted.score(feats.numpy(), y) > 0.5


def test_cli_score_writes_the_contract_and_refuses_another_model(tiny_store, tmp_path, capsys):
    loaded, store = tiny_store
    site = "blocks.0.hook_resid_post"
    X = read_rows(store, site, np.arange(len(store))).numpy()
    probe = LogisticProbe().fit(X, (store.rows.token_id.numpy() % 2).astype(int))
    save_probe(tmp_path / "p", probe, site=site, model_info=loaded.info, training={})
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(t) for t in TEXTS[:2]) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["probe", "score", "--model", "tiny-llama", "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(out), "--probe", str(tmp_path / "p")]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["d0", "d1"]
    assert all(set(r) == {"id", "token_ids", "scores"} and r["scores"][0] is None for r in lines)
    assert all(0 <= s <= 1 for r in lines for s in r["scores"][1:])
    assert main(["probe", "score", "--model", "tiny-gemma3", "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(out), "--probe", str(tmp_path / "p")]) == 2
    assert "trained on tiny-llama" in capsys.readouterr().err


@pytest.mark.real
def test_default_probe_scores_a_famous_text_above_a_control(smollm, tmp_path):
    from memprobe.probes import default_probe_dir

    probe, config = load_probe(default_probe_dir("smollm2-135m"))
    assert config["model"]["sha256"] == smollm.info["sha256"]
    texts = [
        {"id": "gettysburg", "text": "Four score and seven years ago our fathers brought forth on this continent, "
                                     "a new nation, conceived in Liberty, and dedicated to the proposition that "
                                     "all men are created equal."},
        {"id": "email", "text": "Thank you for your email. I am currently out of the office and will reply "
                                "as soon as possible when I return. Best regards, and have a nice day."},
    ]
    famous, email = score_documents(smollm, texts, probe, config)
    assert np.mean(famous["scores"][8:]) > np.mean(email["scores"][8:])


def test_memorization_direction_reads_the_saved_resid_direction(tiny_store, tmp_path):
    from memprobe.errors import MemprobeError
    from memprobe.probes import memorization_direction, save_directions

    loaded, _ = tiny_store
    save_directions(tmp_path, {"blocks.1.hook_resid_post": np.array([3.0, 4.0] + [0.0] * 62)})
    v = memorization_direction(loaded, 1, tmp_path)
    assert v[:2].tolist() == pytest.approx([0.6, 0.8]) and float(v.norm()) == pytest.approx(1.0)
    with pytest.raises(MemprobeError, match="blocks.0.hook_resid_post"):
        memorization_direction(loaded, 0, tmp_path)


@pytest.mark.real
def test_cli_train_then_score_on_smollm(smollm, tmp_path):
    docs = [
        {"id": "mit", "role": "candidate", "text": "Permission is hereby granted, free of charge, to any person "
         "obtaining a copy of this software and associated documentation files (the \"Software\"), to deal in the "
         "Software without restriction, including without limitation the rights to use, copy, modify, merge, "
         "publish, distribute, sublicense, and/or sell copies of the Software."},
        {"id": "email", "role": "control", "text": "Thank you for your email. I am currently out of the office and "
         "will reply as soon as possible when I return. Best regards, and have a nice day."},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    site = "blocks.10.hook_resid_post"
    assert main(["probe", "train", "--model", "smollm2-135m", "--data", str(data), "--out", str(tmp_path / "p"),
                 "--site", site]) == 0
    probe, config = load_probe(tmp_path / "p")
    assert config["site"] == site and config["model"]["sha256"] == smollm.info["sha256"]
    assert config["training"]["tokens"]["memorized"]["tokens"] > 0
    assert main(["probe", "score", "--model", "smollm2-135m", "--input", str(data), "--output",
                 str(tmp_path / "s.jsonl"), "--probe", str(tmp_path / "p")]) == 0
    famous, email = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert np.mean(famous["scores"][1:]) > np.mean(email["scores"][1:])  # its own training data, so separable
