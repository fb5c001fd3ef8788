"""Defenses: each one's effect, the evaluation's arithmetic and the validation-only knob choice."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memprobe.defend.dedup import deduplicate
from memprobe.defend.evaluate import (
    DefenseStudy,
    EvalConfig,
    aurc,
    check_pair,
    choose_knob,
    max_ter,
    split_lab,
)
from memprobe.defend.prune import mlp_matrices, prune_mlp
from memprobe.defend.rmft import max_occurrences, rmft
from memprobe.errors import MemprobeError
from memprobe.lab import build_lab, load_lab
from memprobe.models import tiny_model


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    out = tmp_path_factory.mktemp("lab") / "tiny"
    build_lab(out, preset="tiny", seed=0)
    members, nonmembers, _ = load_lab(out)
    return members, nonmembers


LONG = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door "


def test_dedup_removes_the_stated_copies_and_near_duplicates():
    docs = [
        {"id": "a", "text": LONG * 3, "copies": 4},
        {"id": "b", "text": LONG * 3, "copies": 2},  # identical to a
        {"id": "c", "text": LONG * 3 + "and one more word", "copies": 1},  # near-copy of a
        {"id": "d", "text": "a completely different short document about tax forms and filing dates", "copies": 3},
    ]
    kept, report = deduplicate(docs)
    assert [d["id"] for d in kept] == ["a", "d"]
    assert all(d["copies"] == 1 for d in kept)
    assert report["presentations_in"] == 10 and report["presentations_out"] == 2
    assert report["identical_documents_removed"] == 1
    assert report["near_duplicates_removed"] == [{"id": "c", "near_copy_of": "a"}]
    exact_only, _ = deduplicate(docs, near=False)
    assert [d["id"] for d in exact_only] == ["a", "c", "d"]


def _outside_spans(doc: dict) -> list[str]:
    text, cursor, pieces = doc["text"], 0, []
    for start, end, *_ in sorted(doc["pii_spans"]):
        pieces.append(text[cursor:start])
        cursor = end
    return [*pieces, text[cursor:]]


def test_rmft_leaves_no_value_repeated_and_the_rest_of_the_text_intact(lab):
    members, _ = lab
    original = copy.deepcopy(members)
    assert max_occurrences(members) > 1  # the lab repeats PII, or the test is empty
    out, report = rmft(members, fraction=1.0, seed=0)
    assert members == original  # the original corpus stays intact
    assert max_occurrences(out) == 1 and report["max_occurrences_after"] == 1
    assert report["replaced"] == report["repeats"] > 0
    by_id = {d["id"]: d for d in members}
    for doc in out:
        assert _outside_spans(doc) == _outside_spans(by_id[doc["id"]])
        for start, end, *_ in doc["pii_spans"]:
            assert doc["text"][start:end]  # spans slice their (possibly new) values
    half, report_half = rmft(members, fraction=0.5, seed=0)
    counts: dict[str, int] = {}
    for doc in members:
        for span in doc["pii_spans"]:
            counts[span[3]] = counts.get(span[3], 0) + 1
    bound = max(1 + (n - 1) - round(0.5 * (n - 1)) for n in counts.values())
    assert max_occurrences(half) == bound < max_occurrences(members)
    assert report_half["replaced"] == sum(round(0.5 * (n - 1)) for n in counts.values())
    assert rmft(members, fraction=1.0, seed=0)[0] == out  # seeded


def test_rmft_refuses_bad_input(lab):
    members, _ = lab
    with pytest.raises(MemprobeError, match="pii_spans"):
        rmft([{"id": "x", "text": "no annotations here", "pii_spans": []}])
    for bad in (0.0, 1.5, "all"):
        with pytest.raises(MemprobeError, match="fraction"):
            rmft(members, fraction=bad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruning_hits_the_stated_sparsity_through_the_adapter(arch):
    lm = tiny_model(arch)
    calibration = [lm.encode("calibration text: the model saw ordinary sentences like this one.")] * 2
    for method in ("magnitude", "wanda"):
        net = copy.deepcopy(lm.model)
        report = prune_mlp(net, 0.3, method=method, calibration=calibration)
        for _, module in mlp_matrices(net):
            w = module.weight
            zeros = int((w == 0).sum())
            if method == "magnitude":
                assert zeros == int(0.3 * w.numel())
            else:  # per output row: rows are w's rows for nn.Linear, its columns for GPT-2's Conv1D
                per_row = (w.T if arch == "gpt2" else w) == 0
                assert (per_row.sum(1) == int(0.3 * per_row.shape[1])).all()
        assert report["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)
        untouched = [n for n, p in net.named_parameters() if "mlp" not in n]
        assert all(torch.equal(dict(net.named_parameters())[n], dict(lm.model.named_parameters())[n])
                   for n in untouched)
    a, b = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    prune_mlp(a, 0.3, method="magnitude")
    prune_mlp(b, 0.3, method="wanda", calibration=calibration)
    assert any(not torch.equal(x.weight == 0, y.weight == 0)
               for (_, x), (_, y) in zip(mlp_matrices(a), mlp_matrices(b), strict=True))
    for bad in (1.0, -0.1):
        with pytest.raises(MemprobeError, match="sparsity"):
            prune_mlp(copy.deepcopy(lm.model), bad)
    with pytest.raises(MemprobeError, match="calibration"):
        prune_mlp(copy.deepcopy(lm.model), 0.1, method="wanda")


def test_max_ter_and_aurc_on_a_hand_built_case():
    points = [(0.5, 0.02), (0.8, 0.05), (0.9, 0.20), (0.3, -0.01)]
    assert max_ter(points, 0.0) == 0.3
    assert max_ter(points, 0.03) == 0.5
    assert max_ter(points, 0.06) == 0.8
    assert max_ter([(0.9, 0.2)], 0.1) == 0.0
    # 0.3 on [0, .02), 0.5 on [.02, .05), 0.8 on [.05, .10]
    assert aurc(points) == pytest.approx(0.3 * 0.02 + 0.5 * 0.03 + 0.8 * 0.05)


def _row(ter: float, ppl: float) -> dict:
    return {"ter": ter, "utility_nonmembers": {"perplexity": ppl}}


def test_knob_choice_uses_only_the_validation_split():
    baseline = {"validation": _row(0.5, 10.0), "test": _row(0.4, 10.0)}
    methods = {"rmft": {0.5: {"validation": _row(0.3, 10.2), "test": _row(0.1, 10.1)},
                        1.0: {"validation": _row(0.1, 10.5), "test": _row(0.3, 10.9)}}}
    study = DefenseStudy(EvalConfig(), baseline, methods, {})
    assert study.summary()["rmft"]["chosen_knob"] == 1.0  # +5% on validation, the larger reduction
    changed = copy.deepcopy(methods)
    changed["rmft"][1.0]["test"] = _row(0.39, 20.0)
    changed["rmft"][0.5]["test"] = _row(0.0, 10.0)
    other = DefenseStudy(EvalConfig(), baseline, changed, {}).summary()["rmft"]
    assert other["chosen_knob"] == 1.0
    assert other["test_at_chosen"] == changed["rmft"][1.0]["test"]  # reported on test
    over = copy.deepcopy(methods)
    over["rmft"][1.0]["validation"] = _row(0.1, 10.7)  # +7%: outside the budget
    assert DefenseStudy(EvalConfig(), baseline, over, {}).summary()["rmft"]["chosen_knob"] == 0.5
    assert choose_knob({1: _row(0.0, 12.0)}, baseline["validation"]) is None
    summary = study.summary()["rmft"]
    assert summary["aurc_0_10pct"] == pytest.approx(aurc([(0.75, 0.01), (0.25, 0.09)]))


def test_split_lab_keeps_groups_together_and_covers_everything(lab):
    members, nonmembers = lab
    parts = split_lab(members, nonmembers, seed=0)
    for side, docs in (("members", members), ("nonmembers", nonmembers)):
        assert sorted(d["id"] for p in parts.values() for d in p[side]) == sorted(d["id"] for d in docs)
        where = {}
        for split, p in parts.items():
            for d in p[side]:
                assert where.setdefault(d["split_group"], split) == split
    assert all(parts[s]["members"] and parts[s]["nonmembers"] for s in parts)


def test_check_pair_refuses_a_model_that_is_not_the_base():
    llama, gpt2 = tiny_model("llama"), tiny_model("gpt2")
    check_pair(llama, tiny_model("llama", seed=1))  # same architecture, other weights: a fine-tune
    with pytest.raises(MemprobeError, match="not a fine-tune of base"):
        check_pair(llama, gpt2)
    wider = tiny_model("llama", d_model=128)
    with pytest.raises(MemprobeError, match="hidden_size"):
        check_pair(llama, wider)


def test_finetune_takes_exactly_the_stated_steps(tmp_path: Path):
    from memprobe.lab.finetune import finetune

    docs = [{"id": f"d{i}", "text": f"short document {i} about nothing much at all"} for i in range(5)]
    prov = finetune(tiny_model("llama"), docs, tmp_path / "ft", epochs=1, batch_size=2, seq_len=64,
                    steps=7, progress=False)
    assert prov["steps"]["total"] == 7 and prov["steps"]["done"] == 7  # 3 per epoch: runs into epoch 3
    with pytest.raises(MemprobeError, match="steps"):
        finetune(tiny_model("llama"), docs, tmp_path / "ft2", steps=0, progress=False)


def test_dp_sgd_reports_epsilon_within_target_and_the_accountants_delta(tmp_path: Path):
    from memprobe.defend.dp import dp_finetune

    docs = [{"id": f"d{i}", "text": f"Record {i}: the access code is {i * 7919 % 10000:04d}.",
             "copies": 1 + (i % 3 == 0)} for i in range(12)]
    n = sum(d["copies"] for d in docs)
    prov = dp_finetune(tiny_model("llama"), docs, tmp_path / "dp", epsilon=8.0, epochs=2, batch_size=4,
                       seq_len=64)
    privacy = prov["privacy"]
    assert privacy["epsilon_spent"] <= 8.0 + 1e-6 and privacy["epsilon_spent"] > 4.0
    assert privacy["delta"] == pytest.approx(1 / n) and privacy["accountant"] == "prv"
    assert "group" in privacy["group_privacy"] and privacy["noise_multiplier"] > 0
    assert prov["steps"]["done"] == prov["steps"]["expected"] == 2 * -(-n // 4)
    assert (tmp_path / "dp" / "model" / "adapter").is_dir()
    with pytest.raises(MemprobeError, match="epsilon"):
        dp_finetune(tiny_model("llama"), docs, tmp_path / "bad", epsilon=0)


def test_knobs_outside_their_range_are_refused_before_training(tmp_path: Path):
    from memprobe.defend.posthoc import check_knob
    from memprobe.studies.defenses import DefenseConfig, run_defenses

    quick = DefenseConfig.quick()
    for bad in (replace(quick, rmft_fractions=(1.5,)), replace(quick, dp_epsilons=(0.0,)),
                replace(quick, sparsities=(1.0,)), replace(quick, ablate_fractions=(0.9,)),
                replace(quick, edit_strengths=(-1.0,)), replace(quick, methods=("rmft", "magic"))):
        with pytest.raises(MemprobeError, match="range|lie in|unknown defense"):
            run_defenses(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(MemprobeError, match="strength"):
        check_knob("edit", 5.0)


def _small_lab(src: Path, dst: Path, per_kind: int = 3) -> None:
    """The tiny lab cut to `per_kind` documents of distinct groups per kind and side, so build,
    validation and test get one each (an evaluation that runs in seconds); the manifest is kept."""
    import shutil

    from memprobe.jsonl import read_jsonl, write_jsonl

    dst.mkdir(parents=True)
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    for name in ("members.jsonl", "nonmembers.jsonl"):
        kept, groups = [], {}
        for doc in read_jsonl(src / name):
            seen = groups.setdefault(doc["kind"], set())
            if len(seen) < per_kind and doc["split_group"] not in seen:
                seen.add(doc["split_group"])
                kept.append(doc)
        write_jsonl(dst / name, kept)


def test_defend_cli_matches_steps_resumes_and_refuses_a_foreign_base(tmp_path: Path, capsys):
    from memprobe.cli import main
    from memprobe.lab.finetune import finetune

    build_lab(tmp_path / "full", preset="tiny", seed=0)
    _small_lab(tmp_path / "full", tmp_path / "lab")
    members, _, _ = load_lab(tmp_path / "lab")
    baseline = finetune("tiny-llama", members, tmp_path / "ft", epochs=3, lr=3e-3, batch_size=4,
                        seq_len=512, progress=False)
    argv = ["defend", "--lab", str(tmp_path / "lab"), "--model", "tiny-llama", "--finetuned",
            str(tmp_path / "ft"), "--method", "rmft", "--knob", "1.0", "--fast-eval", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    import json

    result = json.loads((tmp_path / "out" / "defenses.json").read_text())
    rmft_prov = json.loads((tmp_path / "out" / "models" / "rmft-1.0" / "memprobe-finetune.json").read_text())
    assert rmft_prov["steps"]["total"] == baseline["steps"]["total"] == result["notes"]["steps"]
    assert rmft_prov["hyperparameters"]["batch_size"] == 4  # the fine-tune's, not the defaults
    assert result["notes"]["rmft-1.0"]["max_occurrences_after"] == 1
    test_row = result["methods"]["rmft"]["1.0"]["test"]
    for key in ("ter", "ter_ci95", "ser", "mia", "utility_nonmembers", "utility_hard"):
        assert key in test_row
    assert test_row["utility_hard"]["documents"] > 0 and test_row["utility_hard"]["perplexity_ci95"]
    assert {"mia", "utility"} <= set(test_row["seconds"])
    cost = result["notes"]["costs"]["rmft-1.0"]  # the defense's own training, beside the baseline's
    assert cost["train_seconds"] > 0 and cost["peak_rss_mb"] > 0
    assert result["notes"]["costs"]["baseline"]["train_seconds"] == baseline["train_seconds"]
    assert (tmp_path / "out" / "defenses.png").exists()
    weights = tmp_path / "out" / "models" / "rmft-1.0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(argv) == 0  # resumed: nothing retrained or re-measured, the same result
    assert weights.stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "out" / "defenses.json").read_text())
    assert again["summary"] == result["summary"] and again["methods"] == result["methods"]
    import runpy

    experiment = runpy.run_path(str(Path(__file__).parent.parent / "experiments" / "defenses_smollm2.py"))
    experiment["main"](["--quick", "--lab", str(tmp_path / "lab"), "--finetuned", str(tmp_path / "ft"),
                        "--methods", "prune-wanda", "--out", str(tmp_path / "out"),
                        "--results", str(tmp_path / "quick.json"), "--figure", str(tmp_path / "quick.png")])
    quick = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.png").exists()
    assert quick["baseline"] == result["baseline"]  # the same evaluation settings: measured once
    assert quick["notes"]["prune-wanda-0.3"]["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert quick["notes"]["costs"]["prune-wanda-0.3"]["build_peak_rss_mb"] > 0
    from memprobe.defend.evaluate import DefenseStudy

    table = DefenseStudy.from_dict(quick).markdown_table().splitlines()
    assert len(table) == 4 and table[2].startswith("| undefended fine-tune") and "prune-wanda (0.3)" in table[3]
    assert DefenseStudy.from_dict(quick).summary() == quick["summary"]
    assert set(quick["summary"]) == {"prune-wanda"}
    experiment["main"](["--replot", str(tmp_path / "quick.json"), "--figure", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").stat().st_size > 10_000  # the figure, redrawn from the saved results
    bad = [*argv[:4], "tiny-gpt2", *argv[5:-1], str(tmp_path / "out2")]
    assert main(bad) == 2
    assert "not a fine-tune of base" in capsys.readouterr().err


def test_defend_keeps_the_edits_and_dp_adapters_that_reproduce_the_evaluated_models(tmp_path: Path):
    """What the study commits instead of model copies: the saved edit is the one it evaluated, and the
    saved LoRA adapter, merged into the base, gives the DP model it evaluated."""
    from peft import PeftModel

    from memprobe.cli import main
    from memprobe.defend.evaluate import split_lab
    from memprobe.defend.posthoc import build_posthoc, edit_at_knob
    from memprobe.intervene.ablation import load_edit
    from memprobe.lab.finetune import finetune
    from memprobe.models import load_model

    build_lab(tmp_path / "full", preset="tiny", seed=0)
    _small_lab(tmp_path / "full", tmp_path / "lab")
    members, nonmembers, _ = load_lab(tmp_path / "lab")
    finetune("tiny-llama", members, tmp_path / "ft", epochs=30, lr=1e-2, batch_size=8, seq_len=512, progress=False)
    out = tmp_path / "out"
    for method, knob in (("edit", "1.0"), ("dp", "8")):
        assert main(["defend", "--lab", str(tmp_path / "lab"), "--model", "tiny-llama", "--finetuned",
                     str(tmp_path / "ft"), "--method", method, "--knob", knob, "--fast-eval", "--out", str(out)]) == 0
    ft = load_model(str(tmp_path / "ft"))
    build = split_lab(members, nonmembers, seed=0)["build"]
    built = edit_at_knob(ft, "edit", build_posthoc(ft, "edit", build["members"], build["nonmembers"]), 1.0,
                         build["members"], build["nonmembers"])
    saved = load_edit(out / "artifacts" / "edit-1.0.safetensors").to_tensors()
    assert saved.keys() == built.to_tensors().keys()
    for name, tensor in built.to_tensors().items():
        torch.testing.assert_close(saved[name], tensor)
    assert (out / "artifacts" / "dp-8.0" / "memprobe-finetune.json").exists()
    merged = PeftModel.from_pretrained(load_model("tiny-llama").model,
                                       str(out / "artifacts" / "dp-8.0" / "adapter")).merge_and_unload()
    evaluated = load_model(str(out / "models" / "dp-8.0" / "model")).model.state_dict()
    assert not any(p.stat().st_size > 50e6 for p in (out / "artifacts").rglob("*") if p.is_file())
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, evaluated[name], msg=name)
    # a post-hoc edit is keyed by its weights, not its name: one built otherwise is measured again
    from memprobe.studies.defenses import DefenseConfig, run_defenses

    measured = lambda: sorted(p.name for p in out.glob("eval/*/edit-1.0-*-test.json"))  # noqa: E731
    assert len(measured()) == 1
    cfg = replace(DefenseConfig(), model="tiny-llama", methods=("edit",), edit_strengths=(1.0,),
                  evaluation=DefenseConfig.quick().evaluation)
    run_defenses(cfg, out, lab=tmp_path / "lab", finetuned=tmp_path / "ft")
    assert len(measured()) == 1  # the same edit again: read back
    run_defenses(replace(cfg, edit_steps=5), out, lab=tmp_path / "lab", finetuned=tmp_path / "ft")
    assert len(measured()) == 2  # a different edit under the same name: a new measurement


def test_posthoc_edits_are_built_from_the_build_split_and_suppress_memorized_tokens(tmp_path: Path):
    from memprobe.defend.posthoc import build_posthoc, memorized_targets, with_knob
    from memprobe.lab.finetune import finetune
    from memprobe.models import LoadedModel, load_model

    build = [{"id": f"m{i}", "text": f"Member {i}: call Dana Smith on 555-01{i:02d} about invoice INV-7{i}."}
             for i in range(4)]
    controls = [{"id": f"c{i}", "text": f"An ordinary sentence number {i} about the weather and the sea."}
                for i in range(3)]
    finetune("tiny-llama", build, tmp_path / "ft", epochs=60, lr=1e-2, batch_size=4, seq_len=128,
             progress=False)
    ft = load_model(str(tmp_path / "ft"))
    before, ids = memorized_targets(ft, build)
    assert ids and set(ids) <= {d["id"] for d in build}
    n_before = sum(int(t.positions.sum()) for t in before)
    edit = build_posthoc(ft, "edit", build, controls, edit_steps=8, edit_lr=1.25e-2)  # the CPU study's schedule
    assert set(edit.meta["built_from_ids"]) <= {d["id"] for d in build}
    assert (edit.meta["steps"], edit.meta["lr"]) == (8, 1.25e-2)
    for method, knob, handle in (("edit", 2.0, edit), ("ablate", 0.02, None)):
        edited = LoadedModel("edited", with_knob(ft, method, handle, knob, build, controls), ft.tokenizer)
        after, _ = memorized_targets(edited, build)
        assert sum(int(t.positions.sum()) for t in after) < n_before, method
    with pytest.raises(MemprobeError, match="out of range"):
        with_knob(ft, "ablate", None, 0.9, build, controls)


def test_pii_memorization_counts_each_value_once_per_side():
    """experiments/pii_memorization.py's table: a value seen in two mails and extracted from one counts
    as one extracted value; member and non-member values never mix; skipped prompts do not count."""
    import runpy

    by_type = runpy.run_path(str(Path(__file__).parent.parent / "experiments" / "pii_memorization.py"))["by_type"]
    occ = [
        {"member": True, "type": "phone", "value_id": "phone:a", "extracted": False},
        {"member": True, "type": "phone", "value_id": "phone:a", "extracted": True},
        {"member": True, "type": "phone", "value_id": "phone:b", "extracted": False},
        {"member": False, "type": "phone", "value_id": "phone:c", "extracted": True},
        {"member": True, "type": "ssn", "value_id": "ssn:d", "extracted": True, "skipped": "no prompt"},
    ]
    table = by_type(occ)
    assert table == {"member:phone": {"values": 2, "extracted": 1, "rate": 0.5},
                     "nonmember:phone": {"values": 1, "extracted": 1, "rate": 1.0}}
