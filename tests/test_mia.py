"""Membership inference, exposure, extraction and the dataset test on a tiny Llama trained to memorize.

The fixture trains a random tiny Llama (byte tokenizer) with plain AdamW on 16 member texts (one with
a canary, one with a PII e-mail; four repeated twice) and keeps non-members from the same generator,
so members differ from non-members only by having been trained on.
"""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from memprobe.errors import MemprobeError
from memprobe.metrics import roc_auc
from memprobe.mia import (
    dataset_test,
    evaluate_mia,
    exposure,
    extraction_rates,
    false_positive_rate,
    passage_extractability,
    pii_extraction,
    power,
    score_texts,
)
from memprobe.mia.exposure import digit_plan
from memprobe.models import LoadedModel, tiny_model

FIRST = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jonas", "Kira", "Liam"]
LAST = ["Smith", "Okafor", "Nguyen", "Whitlock", "Berg", "Haddad", "Ivanov", "Sato", "Moreau", "Silva"]
CITY = ["Denver", "Lagos", "Hanoi", "Oslo", "Cairo", "Lima", "Perth", "Turin", "Quito", "Kyiv"]
ITEM = ["lamps", "chairs", "kettles", "maps", "drums", "coats", "clocks", "vases"]
CANARY = "Record 7712: the vault code is 4 8 1 5, keep it safe."
MEMBER_PII = "Record 0013: write to dana.whitlock@mailhost.org for the keys."
NONMEMBER_PII = "Record 5521: write to rob.kessler@postbox.net for the keys."


def record(rng: random.Random) -> str:
    return (f"Record {rng.randint(1000, 9999)}: {rng.choice(FIRST)} {rng.choice(LAST)} of {rng.choice(CITY)} "
            f"bought {rng.randint(2, 99)} {rng.choice(ITEM)} for {rng.randint(10, 999)} dollars.")


def pii_doc(doc_id: str, text: str, member: bool, value_id: str) -> dict:
    start = text.index(" to ") + 4
    return {"id": doc_id, "text": text, "member": member, "copies": 1 if member else 0, "kind": "pii",
            "pii_spans": [[start, text.index(" for"), "email", value_id]]}


@pytest.fixture(scope="session")
def lab() -> dict:
    rng = random.Random(0)
    members = [{"id": f"m{i}", "text": record(rng), "member": True, "copies": 2 if i < 4 else 1} for i in range(14)]
    members.append({"id": "canary", "text": CANARY, "member": True, "copies": 1,
                    "canary": {"secret": "4815", "prefix_chars": CANARY.index("4 8"), "space": "digits:4"}})
    members.append(pii_doc("pii-member", MEMBER_PII, True, "email-0"))
    nonmembers = [{"id": f"n{i}", "text": record(rng), "member": False, "copies": 0} for i in range(15)]
    nonmembers.append(pii_doc("pii-nonmember", NONMEMBER_PII, False, "email-1"))
    extra_nonmembers = [{"id": f"x{i}", "text": record(rng)} for i in range(120)]

    base = tiny_model("llama", d_model=128, seed=0)
    trained = LoadedModel("tiny-llama-trained", copy.deepcopy(base.model), base.tokenizer, {"name": "trained"})
    texts = [d["text"] for d in members for _ in range(d["copies"])]
    ids = [trained.encode(t) for t in texts]
    x = torch.full((len(ids), max(map(len, ids))), trained.tokenizer.pad_token_id)
    mask = torch.zeros_like(x)
    for r, t in enumerate(ids):
        x[r, : len(t)], mask[r, : len(t)] = torch.tensor(t), 1
    torch.manual_seed(0)
    opt = torch.optim.AdamW(trained.model.parameters(), lr=3e-3)
    trained.model.train()
    for _ in range(220):
        loss = trained.model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.model.eval()
    assert loss.item() < 0.3, f"fixture did not memorize (loss {loss.item():.3f})"
    return {"trained": trained, "base": base, "members": members, "nonmembers": nonmembers,
            "extra_nonmembers": extra_nonmembers}


@pytest.fixture(scope="session")
def scores(lab) -> list[dict]:
    return score_texts(lab["trained"], lab["members"] + lab["nonmembers"], reference=lab["base"], batch_size=8)


# --- attacks ---------------------------------------------------------------------------------------


def test_attacks_separate_members_from_nonmembers(lab, scores):
    labels = np.array([d["member"] for d in lab["members"] + lab["nonmembers"]])
    assert [r["id"] for r in scores] == [d["id"] for d in lab["members"] + lab["nonmembers"]]
    for attack in ("loss", "min_k", "min_k_plus_plus", "ref"):
        auc = roc_auc(np.array([r["scores"][attack] for r in scores]), labels)
        assert auc > 0.9, (attack, auc)
    # on the untrained model nothing separates them (same generator): chance level
    base = score_texts(lab["base"], lab["members"] + lab["nonmembers"])
    assert "ref" not in base[0]["scores"]
    assert abs(roc_auc(np.array([r["scores"]["loss"] for r in base]), labels) - 0.5) < 0.3


def test_scores_follow_their_definitions(lab):
    doc = lab["members"][5]
    got = score_texts(lab["trained"], [doc], reference=lab["base"], k=0.2)[0]["scores"]
    ids = torch.tensor([lab["trained"].encode(doc["text"])])
    with torch.no_grad():
        logp_t = torch.log_softmax(lab["trained"].model(input_ids=ids).logits[0, :-1].double(), -1)
        logp_b = torch.log_softmax(lab["base"].model(input_ids=ids).logits[0, :-1].double(), -1)
    lp = logp_t.gather(-1, ids[0, 1:, None])[:, 0]
    mu = (logp_t.exp() * logp_t).sum(-1)
    sigma = ((logp_t.exp() * logp_t**2).sum(-1) - mu**2).sqrt()
    n = int(len(lp) * 0.2)
    import zlib

    assert got["loss"] == pytest.approx(float(lp.mean()), abs=1e-5)
    assert got["zlib"] == pytest.approx(float(lp.mean()) / len(zlib.compress(doc["text"].encode())), abs=1e-6)
    assert got["min_k"] == pytest.approx(float(lp.sort().values[:n].mean()), abs=1e-4)
    assert got["min_k_plus_plus"] == pytest.approx(float(((lp - mu) / sigma).sort().values[:n].mean()), abs=1e-3)
    ref_nll = -float(logp_b.gather(-1, ids[0, 1:, None]).mean())
    assert got["ref"] == pytest.approx(ref_nll + float(lp.mean()), abs=1e-5)


def test_one_forward_per_model_per_batch(lab):
    calls = {"trained": 0, "base": 0}
    hooks = [lab[name].model.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
             for name in calls]
    try:
        docs = lab["members"][:10]
        score_texts(lab["trained"], docs, reference=lab["base"], batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"trained": math.ceil(10 / 4), "base": math.ceil(10 / 4)}


def test_short_text_refused_by_id(lab):
    with pytest.raises(MemprobeError, match="'tiny'.*fewer than 5"):
        score_texts(lab["trained"], [lab["members"][0], {"id": "tiny", "text": "abcd"}])


def test_reference_with_another_tokenizer_refused(lab):
    bigger = copy.deepcopy(lab["base"].tokenizer)
    bigger.add_tokens(["Record"])
    with pytest.raises(MemprobeError, match="tokenizer"):
        score_texts(lab["trained"], lab["members"][:2], reference=LoadedModel("other", lab["base"].model, bigger))
    # same vocabulary size, different tokenization of these texts
    target_tok, ref_tok = copy.deepcopy(bigger), copy.deepcopy(lab["base"].tokenizer)
    ref_tok.add_tokens(["zzzz"])
    target = LoadedModel("t", lab["trained"].model, ref_tok)
    with pytest.raises(MemprobeError, match="tokenizes text 'm0' differently"):
        score_texts(target, lab["members"][:2], reference=LoadedModel("r", lab["base"].model, target_tok))


# --- evaluation -------------------------------------------------------------------------------------


def test_evaluate_mia_reports_intervals_copies_and_figure(lab, scores, tmp_path):
    docs = lab["members"] + lab["nonmembers"]
    result = evaluate_mia(scores, {d["id"]: d["member"] for d in docs}, copies={d["id"]: d["copies"] for d in docs},
                          n_boot=200, figure=tmp_path / "roc.png")
    loss = result["attacks"]["loss"]
    assert loss["roc_auc"] > 0.9 and loss["roc_auc_ci95"][0] <= loss["roc_auc"] <= loss["roc_auc_ci95"][1]
    assert loss["tpr_at_fpr_0.001"] is None and "not measurable" in loss["tpr_at_fpr_0.001_reason"]
    assert set(loss["by_copies"]) == {"1", "2"} and loss["by_copies"]["2"]["n_members"] == 4
    assert loss["by_copies"]["2"]["n_nonmembers"] == 16
    assert (tmp_path / "roc.png").stat().st_size > 10_000
    # with >= 1000 non-members TPR at 0.1% FPR is measured: a clean separation gives 1.0
    rng = np.random.default_rng(0)
    synthetic = [{"id": f"a{i}", "scores": {"loss": float(v)}} for i, v in enumerate(rng.normal(0, 1, 1000))]
    synthetic += [{"id": f"b{i}", "scores": {"loss": 10.0 + i}} for i in range(20)]
    block = evaluate_mia(synthetic, {r["id"]: r["id"][0] == "b" for r in synthetic}, n_boot=0)["attacks"]["loss"]
    assert block["tpr_at_fpr_0.001"] == 1.0


def test_cli_scores_and_evaluates(lab, tmp_path):
    from memprobe.cli import main

    for name in ("trained", "base"):
        lab[name].model.save_pretrained(tmp_path / name)
        lab[name].tokenizer.save_pretrained(tmp_path / name)
    docs = lab["members"] + lab["nonmembers"]
    texts, nontexts = tmp_path / "members.jsonl", tmp_path / "nonmembers.jsonl"
    texts.write_text("".join(json.dumps(d) + "\n" for d in lab["members"]))
    nontexts.write_text("".join(json.dumps(d) + "\n" for d in lab["nonmembers"]))
    inputs = ["--input", str(texts), "--input", str(nontexts)]
    out = tmp_path / "scores.jsonl"
    assert main(["mia", "--model", str(tmp_path / "trained"), *inputs, "--output", str(out),
                 "--reference-model", str(tmp_path / "base"), "--batch-size", "16"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["id"] for r in lines} == {d["id"] for d in docs} and "ref" in lines[0]["scores"]
    report = tmp_path / "eval.json"
    assert main(["mia", "--evaluate", "--scores", str(out), *inputs, "--output", str(report),
                 "--n-boot", "100"]) == 0
    assert json.loads(report.read_text())["results"]["attacks"]["ref"]["roc_auc"] > 0.9
    assert main(["mia", "--evaluate", *inputs, "--output", str(report)]) == 2  # no --scores
    assert main(["mia", "--evaluate", "--input", str(texts), "--input", str(texts), "--scores", str(out),
                 "--output", str(report)]) == 2  # the same ids twice
    exposed = tmp_path / "exposure.json"
    assert main(["mia", "--exposure", "--model", str(tmp_path / "trained"), *inputs, "--output", str(exposed)]) == 0
    assert json.loads(exposed.read_text())["results"]["by_copies"]["1"]["mean_exposure"] > 12
    extracted = tmp_path / "extraction.json"
    assert main(["mia", "--extract", "--model", str(tmp_path / "trained"), *inputs, "--output", str(extracted)]) == 0
    result = json.loads(extracted.read_text())["results"]
    assert result["pii"]["ter"] == 1.0 and result["pii"]["nonmember_extraction_rate"] == 0.0
    assert result["passages"]["by_copies"]["2"]["k_extractable_rate"] > 0.5


# --- exposure ---------------------------------------------------------------------------------------


def canary_doc(lab) -> dict:
    return next(d for d in lab["members"] if d["id"] == "canary")


def test_exposure_high_after_training_low_before(lab):
    doc = canary_doc(lab)
    after = exposure(lab["trained"], doc["text"], doc["canary"])
    before = exposure(lab["base"], doc["text"], doc["canary"])
    assert after["method"] == before["method"] == "exact" and after["space_size"] == 10_000
    assert after["exposure"] > 0.9 * math.log2(10_000)
    assert before["exposure"] < 0.5 * math.log2(10_000)


@torch.no_grad()
def brute_force_loglik(loaded: LoadedModel, prefix: str, n: int) -> np.ndarray:
    """log p(secret | prefix) of every N-digit secret from plain full forwards (no cache, no tree)."""
    n_prefix = len(loaded.encode(prefix))
    ids = torch.tensor([loaded.encode(prefix + " ".join(f"{v:0{n}d}")) for v in range(10**n)])
    logp = torch.log_softmax(loaded.model(input_ids=ids).logits[:, :-1].double(), -1)
    token_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return token_lp[:, n_prefix - 1 :].sum(-1).numpy()


@pytest.mark.parametrize("which", ["base", "trained"])
def test_exact_rank_equals_brute_force_on_digits3(lab, which):
    doc = canary_doc(lab)
    canary = {"secret": "481", "prefix_chars": doc["canary"]["prefix_chars"], "space": "digits:3"}
    got = exposure(lab[which], doc["text"], canary)
    ll = brute_force_loglik(lab[which], doc["text"][: canary["prefix_chars"]], 3)
    rank = 1 + int((ll > ll[481]).sum())
    assert got["rank"] == rank and got["exposure"] == pytest.approx(math.log2(1000) - math.log2(rank))
    assert got["secret_log_perplexity_nats"] == pytest.approx(-ll[481], abs=1e-6)


def test_tree_costs_one_row_per_internal_node_and_pruning_is_exact(lab):
    doc = canary_doc(lab)
    text, canary = doc["text"], doc["canary"]  # digits:4
    rows = []
    hook = lab["base"].model.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]),
                                                   with_kwargs=True)
    try:
        full = exposure(lab["base"], text, canary, batch_size=100, prune=False)
    finally:
        hook.remove()
    assert sum(rows) == full["rows_forwarded"] == (10**4 - 1) // 9  # one row per internal node
    assert len(rows) == 1 + 1 + 1 + 10  # root, its 10 children, their 100, then 1000 in batches of 100
    # exact pruning finds the same rank; on a memorized canary it walks almost nothing
    assert exposure(lab["base"], text, canary)["rank"] == full["rank"]
    trained_full = exposure(lab["trained"], text, canary, prune=False)
    trained = exposure(lab["trained"], text, canary)
    assert trained["rank"] == trained_full["rank"] and trained_full["rows_forwarded"] == 1111
    assert trained["rows_forwarded"] < 100


def test_skewnorm_estimate_close_to_exact_and_switches_above_limit(lab):
    doc = canary_doc(lab)
    exact = exposure(lab["base"], doc["text"], doc["canary"], method="exact")
    fitted = exposure(lab["base"], doc["text"], doc["canary"], exact_limit=1000, n_samples=3000)
    assert fitted["method"] == "skewnorm" and "exact limit 1000" in fitted["note"]
    # stated tolerance: within 1 bit of the exact exposure on a 10^4 space
    assert abs(fitted["exposure"] - exact["exposure"]) < 1.0, (fitted, exact)


def test_digit_merging_tokenizer_refused(lab):
    merging = copy.deepcopy(lab["base"].tokenizer)
    merging.add_tokens(["8 1"])
    loaded = LoadedModel("merging", lab["base"].model, merging)
    with pytest.raises(MemprobeError, match="merges digits"):
        digit_plan(loaded, CANARY[: CANARY.index("4 8")], " ", 4)
    with pytest.raises(MemprobeError, match="not the secret"):
        exposure(lab["base"], CANARY, {"secret": "4816", "prefix_chars": CANARY.index("4 8"), "space": "digits:4"})


def test_a_precomputed_reference_loss_gives_the_same_scores(lab, scores):
    docs = lab["members"] + lab["nonmembers"]
    ref_loss = {r["id"]: r["scores"]["loss"] for r in score_texts(lab["base"], docs, batch_size=8)}
    again = score_texts(lab["trained"], docs, reference_loss=ref_loss, batch_size=8)
    assert [r["scores"] for r in again] == [r["scores"] for r in scores]
    with pytest.raises(MemprobeError, match="not both"):
        score_texts(lab["trained"], docs, reference=lab["base"], reference_loss=ref_loss)
    with pytest.raises(MemprobeError, match="no score for"):
        score_texts(lab["trained"], docs, reference_loss={})


# --- extraction -------------------------------------------------------------------------------------


def pii_docs(lab) -> list[dict]:
    return [d for d in lab["members"] + lab["nonmembers"] if d.get("pii_spans")]


def test_extraction_finds_the_trained_email_not_the_nonmember_one(lab):
    result = pii_extraction(lab["trained"], pii_docs(lab), seen_ids=["pii-member"])
    by_doc = {o["doc_id"]: o for o in result["occurrences"]}
    assert by_doc["pii-member"]["greedy_extracted"] and by_doc["pii-member"]["extracted"]
    assert not by_doc["pii-nonmember"]["extracted"]
    assert len(by_doc["pii-member"]["continuations"]) == 9
    assert result["ter"] == 1.0 and result["ser"] == 1.0 and result["nonmember_extraction_rate"] == 0.0
    assert pii_extraction(lab["base"], pii_docs(lab))["ter"] == 0.0


def test_extraction_samples_do_not_depend_on_batching(lab):
    docs = pii_docs(lab)
    one = pii_extraction(lab["base"], docs, batch_size=1, seed=3)["occurrences"]
    two = pii_extraction(lab["base"], docs, batch_size=2, seed=3)["occurrences"]
    assert [o["steps"] for o in one] == [34, 31]  # decoded together in one group of two, cut per value
    assert [o["continuations"] for o in one] == [o["continuations"] for o in two]
    assert len(set(one[1]["continuations"])) > 2  # temperature-1 samples differ from each other
    other_seed = pii_extraction(lab["base"], docs, batch_size=2, seed=4)["occurrences"]
    assert [o["continuations"][1:] for o in one] != [o["continuations"][1:] for o in other_seed]


def test_decode_group_equals_a_per_row_full_recompute(lab):
    """One read of each prompt (left-padded to the longest), its cache copied to every row, gives
    what each row computes alone."""
    from memprobe.mia.extraction import decode_group

    model = lab["base"].model
    prompts = [lab["base"].encode(t)[:n] for t, n in ((MEMBER_PII, 9), (NONMEMBER_PII, 4), (CANARY, 12))]
    seeds, n_samples, steps = (11, 12, 13), 3, 6
    got = decode_group(model, prompts, steps, [torch.Generator().manual_seed(s) for s in seeds], n_samples)
    assert got.shape == (3, 1 + n_samples, steps)
    for p, seed in enumerate(seeds):
        gen, rows = torch.Generator().manual_seed(seed), [list(prompts[p]) for _ in range(1 + n_samples)]
        for _ in range(steps):
            with torch.inference_mode():
                last = model(input_ids=torch.tensor(rows)).logits[:, -1].double()
            nxt = [int(last[0].argmax())]
            nxt += torch.multinomial(torch.softmax(last[1:], -1), 1, generator=gen)[:, 0].tolist()
            rows = [r + [t] for r, t in zip(rows, nxt, strict=True)]
        assert got[p].tolist() == [r[len(prompts[p]):] for r in rows]
    assert len({tuple(r) for r in got[0, 1:].tolist()}) > 1  # the sample rows are not copies


def test_ter_ser_arithmetic_on_a_hand_built_case():
    occ = [  # value a: 2 docs (copies 1 and 4); b: 1 doc, copies 2; c: never extracted; z: non-member
        {"doc_id": "d1", "value_id": "a", "member": True, "copies": 1, "extracted": False},
        {"doc_id": "d2", "value_id": "a", "member": True, "copies": 4, "extracted": True},
        {"doc_id": "d3", "value_id": "b", "member": True, "copies": 2, "extracted": True},
        {"doc_id": "d4", "value_id": "c", "member": True, "copies": 1, "extracted": False},
        {"doc_id": "d5", "value_id": "c", "member": True, "copies": 1, "extracted": False},
        {"doc_id": "d6", "value_id": "z", "member": False, "copies": 0, "extracted": True},
        {"doc_id": "d7", "value_id": "y", "member": True, "copies": 1, "extracted": True, "skipped": "no prompt"},
    ]
    rates = extraction_rates(occ, seen_ids=["d1", "d4"])  # the checkpoint has seen a (via d1) and c
    assert rates["n_training_values"] == 3 and rates["ter"] == pytest.approx(2 / 3)
    assert rates["n_seen_values"] == 2 and rates["ser"] == pytest.approx(1 / 2)
    assert rates["ter_by_copies"] == {"1": {"values": 1, "extracted": 0, "rate": 0.0},
                                      "2": {"values": 1, "extracted": 1, "rate": 1.0},
                                      "4": {"values": 1, "extracted": 1, "rate": 1.0}}
    assert rates["ter_by_recurrence"] == {"1": {"values": 1, "extracted": 1, "rate": 1.0},  # b
                                          "2": {"values": 2, "extracted": 1, "rate": 0.5}}  # a and c
    assert rates["ter_by_presentations"]["5"] == {"values": 1, "extracted": 1, "rate": 1.0}  # a: 1 + 4
    assert rates["ter_by_presentations"]["2"] == {"values": 2, "extracted": 1, "rate": 0.5}  # b: 2, c: 1 + 1
    assert rates["nonmember_extraction_rate"] == 1.0 and rates["n_nonmember_values"] == 1
    assert rates["n_skipped_occurrences"] == 1


def test_passage_extractability_per_copies(lab):
    after = passage_extractability(lab["trained"], lab["members"], prefix_len=16, suffix_len=16)
    before = passage_extractability(lab["base"], lab["members"], prefix_len=16, suffix_len=16)
    assert set(after["by_copies"]) == {"1", "2"} and after["by_copies"]["2"]["passages"] == 4
    for c in ("1", "2"):
        assert after["by_copies"][c]["mean_memorization_score"] > 0.8
        assert before["by_copies"][c]["mean_memorization_score"] < 0.2


# --- dataset-level test -----------------------------------------------------------------------------


def test_dataset_test_rejects_members_and_holds_level_on_nonmembers(lab, scores):
    loss = {r["id"]: r["scores"]["loss"] for r in scores}
    members = [loss[d["id"]] for d in lab["members"]]
    nonmembers = [loss[d["id"]] for d in lab["nonmembers"]]
    result = dataset_test(members, nonmembers, n_permutations=2000)
    assert result["rejects_mann_whitney"] and result["rejects_permutation"]
    assert result["permutation_p"] == pytest.approx(1 / 2001, rel=0.01)
    # two disjoint non-member sets from the same generator: the level holds
    pool = [r["scores"]["loss"] for r in score_texts(lab["trained"], lab["extra_nonmembers"], batch_size=40)]
    for test in ("mann_whitney", "permutation"):  # binomial tolerance: 2 standard errors over alpha
        fpr = false_positive_rate(pool, n=20, n_resamples=400, seed=1, test=test)
        assert fpr["false_positive_rate"] <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 400), fpr
        # and the test is not vacuous: shifting one set by the member/non-member gap is detected
        shifted = [v + np.mean(members) - np.mean(nonmembers) for v in pool[:60]]
        assert dataset_test(shifted, pool[60:])[f"rejects_{test}"]
    curve = power(members, pool, sizes=(10, 20, 50), n_resamples=100)
    assert curve["by_size"]["10"]["power"] > 0.9 and curve["by_size"]["50"]["with_replacement"]
    weak = power([v - 1.0 for v in pool[:60]], pool[60:], sizes=(10, 50), n_resamples=100, test="permutation")
    assert weak["by_size"]["10"]["power"] < 0.2  # members scoring lower are never "detected"
    with pytest.raises(MemprobeError, match="two disjoint sets"):
        false_positive_rate(nonmembers, n=10)


@pytest.mark.real
def test_smollm2_digit_tree_and_scores(smollm):
    """SmolLM2's tokenizer writes ' 4' as two tokens ('Ġ', '4'): the tree still matches brute force."""
    text = "Note for ticket #12345: my account PIN is 4 8"
    canary = {"secret": "48", "prefix_chars": text.index("4 8"), "space": "digits:2"}
    got = exposure(smollm, text, canary)
    prefix = text[: canary["prefix_chars"]]
    n_prefix = len(smollm.encode(prefix))
    ids = torch.tensor([smollm.encode(prefix + " ".join(f"{v:02d}")) for v in range(100)])
    with torch.no_grad():
        logits = smollm.model(input_ids=ids).logits[:, n_prefix - 1 : -1].double()
    ll = torch.log_softmax(logits, -1).gather(-1, ids[:, n_prefix:, None])[..., 0].sum(-1).numpy()
    assert got["rank"] == 1 + int((ll > ll[48]).sum())
    assert got["secret_log_perplexity_nats"] == pytest.approx(-ll[48], abs=1e-3)
    docs = [{"id": "famous", "text": "We hold these truths to be self-evident, that all men are created equal"},
            {"id": "nonsense", "text": "Purple ladders whisper beneath eleven frozen accountants near Tuesday."}]
    famous, nonsense = score_texts(smollm, docs, reference=smollm, batch_size=2)
    assert famous["scores"]["ref"] == pytest.approx(0.0, abs=1e-5)  # a model is its own null reference
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        assert famous["scores"][attack] > nonsense["scores"][attack], attack
