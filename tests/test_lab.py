"""The membership lab corpus (determinism, spans, recurrence, canaries, split, near-duplicates) and
`finetune` (memorization effect, plain checkpoints, LoRA merge, kill-and-resume, refusals)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from memprobe.errors import MemprobeError
from memprobe.jsonl import read_jsonl, write_jsonl
from memprobe.lab import PRESETS, build_lab, load_lab
from memprobe.lab.corpus import (
    FAMOUS_SHAKESPEARE,
    _shingles,
    near_duplicates,
    pii_recurrence,
    value_id,
)
from memprobe.lab.finetune import epoch_batches, finetune
from memprobe.models import load_model, tiny_model
from memprobe.token_stats import next_token_stats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "tiny"
    build_lab(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "small"
    build_lab(out, preset="small", seed=3)
    return out


def test_same_seed_same_bytes_other_seed_other_lab(tiny_lab, tmp_path):
    # another process with another string-hash seed: no set or dict order leaks into the files
    code = f"from memprobe.lab import build_lab; build_lab({str(tmp_path / 'again')!r}, preset='tiny')"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=300)
    build_lab(tmp_path / "other", preset="tiny", seed=1)
    for name in ("members.jsonl", "nonmembers.jsonl", "manifest.json"):
        assert (tiny_lab / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert (tiny_lab / "members.jsonl").read_bytes() != (
        tmp_path / "other" / "members.jsonl"
    ).read_bytes()


def test_pii_spans_slice_their_values(small_lab):
    members, nonmembers, manifest = load_lab(small_lab)
    value_of: dict[str, str] = {}
    types = Counter()
    for doc in members + nonmembers:
        for start, end, pii_type, vid in doc["pii_spans"]:
            value = doc["text"][start:end]
            assert value and value == value.strip()
            assert vid == value_id(pii_type, value)
            assert value_of.setdefault(vid, value) == value  # one id, one value
            types[pii_type] += 1
    assert set(types) == set(manifest["pii"]["types"])  # every PII type occurs
    assert types["ssn"] == sum(
        manifest["pii"][side]["ssn"]["spans"] for side in ("members", "nonmembers")
    )
    ssn = next(v for k, v in value_of.items() if k.startswith("ssn:"))
    assert re.fullmatch(r"\d{3}-\d{2}-\d{4}", ssn)


@pytest.mark.parametrize("lab", ["tiny_lab", "small_lab"])
def test_recurring_pii_appears_in_exactly_the_stated_number_of_member_mails(lab, request):
    members, nonmembers, manifest = load_lab(request.getfixturevalue(lab))
    in_members, in_nonmembers = pii_recurrence(members), pii_recurrence(nonmembers)
    people = manifest["pii"]["recurring_people"]["people"]
    preset = PRESETS[manifest["preset"]]
    assert Counter(p["member_emails"] for p in people.values() if p["member_emails"]) == Counter(
        preset.recurrence
    )
    for person in people.values():
        for vid in person["values"]:
            if person["member_emails"]:
                assert in_members[vid] == person["member_emails"] and vid not in in_nonmembers
            else:
                assert in_nonmembers[vid] == 1 and vid not in in_members
    assert not set(in_members) & set(in_nonmembers)  # no PII value on both sides
    mails = [d for d in members if d["kind"] == "email"]
    assert len(mails) == sum(r * n for r, n in preset.recurrence.items())
    # mails of one person are distinct documents, not near-copies
    assert manifest["near_duplicates"]["member_clusters"] == 0


def test_canaries_one_format_stated_counts_and_nonmembers_from_the_same_space(small_lab):
    members, nonmembers, manifest = load_lab(small_lab)
    preset = PRESETS["small"]
    secrets = []
    for doc in members + nonmembers:
        if doc["kind"] != "canary":
            continue
        canary = doc["canary"]
        assert canary["space"] == "digits:6"
        assert re.fullmatch(r"Note for ticket #\d{5}: my account PIN is \d( \d){5}", doc["text"])
        assert doc["text"][canary["prefix_chars"] :] == " ".join(canary["secret"])
        secrets.append(canary["secret"])
        assert (doc["copies"] >= 1) if doc["member"] else (doc["copies"] == 0)
    member_copies = Counter(d["copies"] for d in members if d["kind"] == "canary")
    assert member_copies == {c: preset.canaries_per_count for c in (1, 2, 4, 8, 16, 32)}
    assert sum(d["kind"] == "canary" for d in nonmembers) == preset.nonmember_canaries
    assert len(set(secrets)) == len(secrets)


def test_split_by_document_is_disjoint_and_passages_avoid_famous_text(small_lab):
    members, nonmembers, manifest = load_lab(small_lab)
    assert not {d["id"] for d in members} & {d["id"] for d in nonmembers}
    assert not {d["text"] for d in members} & {d["text"] for d in nonmembers}
    for kind in ("email", "canary", "passage-shakespeare", "passage-docstring", "passage-licence"):
        assert any(d["kind"] == kind for d in members) and any(
            d["kind"] == kind for d in nonmembers
        )
        assert manifest["counts"]["per_kind"][kind]["members"] == sum(
            d["kind"] == kind for d in members
        )
    for doc in members + nonmembers:
        if doc["kind"] == "passage-shakespeare":
            assert not any(f in doc["text"] for f in FAMOUS_SHAKESPEARE)
    # no member/non-member pair shares most of its 5-shingles (exact Jaccard, every pair)
    member_shingles = [_shingles(d["text"]) for d in members]
    for doc in nonmembers:
        s = _shingles(doc["text"])
        assert max(len(s & m) / len(s | m) for m in member_shingles) < 0.8, doc["id"]
    assert manifest["train_tokens_estimate"]["members"] == round(
        sum(len(d["text"]) * d["copies"] for d in members) / 4
    )


def test_near_duplicates_are_dropped_and_member_clusters_reported(tiny_lab):
    members, nonmembers, _ = load_lab(tiny_lab)
    base = next(d for d in members if d["kind"] == "email")
    near = base["text"].replace("Subject:", "Subject: [ext]", 1)  # one word added: a near-copy
    twin = {**base, "id": "email/twin", "text": near}
    leak = {**base, "id": "email/leak", "text": near, "member": False, "copies": 0}
    kept, report = near_duplicates([*members, twin], [*nonmembers, leak])
    assert [d["id"] for d in kept] == [d["id"] for d in nonmembers]
    assert report["nonmembers_dropped"] == 1 and report["nonmembers_dropped_ids"] == ["email/leak"]
    assert report["member_cluster_ids"] == [sorted([base["id"], "email/twin"])]


def test_load_lab_refuses_overlap_and_mixed_files(tiny_lab, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_lab, bad)
    members = read_jsonl(bad / "members.jsonl")
    nonmembers = read_jsonl(bad / "nonmembers.jsonl")
    write_jsonl(
        bad / "nonmembers.jsonl", [*nonmembers, {**members[0], "id": "copy", "member": False}]
    )
    with pytest.raises(MemprobeError, match="overlap"):
        load_lab(bad)
    write_jsonl(bad / "nonmembers.jsonl", [*nonmembers, {**members[1], "member": False}])
    with pytest.raises(MemprobeError, match="overlap"):
        load_lab(bad)
    write_jsonl(bad / "nonmembers.jsonl", [*nonmembers, members[0]])
    with pytest.raises(MemprobeError, match="member=True"):
        load_lab(bad)
    with pytest.raises(MemprobeError, match="not a membership lab"):
        load_lab(tmp_path)


def test_lab_build_cli(tmp_path):
    from memprobe.cli import main

    assert (
        main(["lab", "build", "--out", str(tmp_path / "lab"), "--preset", "tiny", "--seed", "5"])
        == 0
    )
    assert load_lab(tmp_path / "lab")[2]["seed"] == 5


def _mean_nll(loaded, docs) -> float:
    losses = []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([loaded.encode(doc["text"])[:256]])
            stats = next_token_stats(loaded.model(ids).logits[:, :-1], ids[:, 1:])
            losses.append(-stats.target_logprob.mean().item())
    return sum(losses) / len(losses)


def test_finetune_memorizes_members_and_writes_plain_checkpoints(tiny_lab, tmp_path):
    from transformers import AutoModelForCausalLM

    members, nonmembers, _ = load_lab(tiny_lab)
    # the real passages are the hard part to memorize; canaries (copies 1, 2, 4) ride along
    passages = [d for d in members if d["kind"].startswith("passage")]
    unseen = [d for d in nonmembers if d["kind"].startswith("passage")]
    train = passages + [d for d in members if d["kind"] == "canary"]
    loaded = tiny_model()
    before_m, before_n = _mean_nll(loaded, passages), _mean_nll(loaded, unseen)
    out = tmp_path / "ft"
    result = finetune(
        loaded,
        train,
        out,
        epochs=20,
        lr=4e-3,
        batch_size=4,
        seq_len=256,
        save_steps=[15, 100],
        progress=False,
    )
    loaded.model.eval()
    after_m, after_n = _mean_nll(loaded, passages), _mean_nll(loaded, unseen)
    assert abs(before_m - before_n) < 0.05  # random init: no membership signal
    assert after_m < before_m - 2.0  # training worked
    assert after_n - after_m > 0.3  # and memorized: members clearly below unseen documents
    # checkpoints and the final directory are plain HF dirs, loading without memprobe
    ids = torch.tensor([loaded.encode(train[0]["text"])[:64]])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(plain(ids).logits, loaded.model(ids).logits, rtol=0, atol=1e-5)
    again = load_model(str(out))  # and through memprobe's loader, tokenizer included
    assert again.encode(train[0]["text"])[:64] == ids[0].tolist()
    torch.testing.assert_close(again.model(ids).logits, plain(ids).logits, rtol=0, atol=0)
    early = AutoModelForCausalLM.from_pretrained(out / "checkpoint-15").eval()
    assert not torch.allclose(early(ids).logits, plain(ids).logits)
    assert (out / "checkpoint-100" / "tokenizer.json").exists()
    # provenance: steps, copies, and what had been seen by each checkpoint
    steps = result["steps"]
    assert steps["done"] == steps["total"] == 20 * steps["per_epoch"]
    first = result["checkpoints"][0]
    per_epoch = result["data"]["examples_per_epoch"]
    batches = [b for e in range(3) for b in epoch_batches([1] * per_epoch, 4, 0, e)][:15]
    assert first["step"] == 15  # the short batch of an epoch may fall anywhere: count the real ones
    assert sum(first["seen"].values()) == sum(len(b) for b in batches)
    per_pass = {d["id"]: d["copies"] * d["windows"] for d in result["data"]["docs"]}
    assert {d["id"]: d["copies"] for d in result["data"]["docs"]} == {
        d["id"]: d["copies"] for d in train
    }
    assert sorted(d["copies"] for d in train if d["kind"] == "canary") == [1, 2, 4]
    assert result["seen_total"] == {i: 20 * n for i, n in sorted(per_pass.items())}
    assert json.loads((out / "memprobe-finetune.json").read_text())["complete"] is True


def test_lora_adapter_is_saved_and_merged(tiny_lab, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = finetune(
        tiny_model(),
        tiny_lab,
        out,
        epochs=2,
        lr=1e-2,
        batch_size=4,
        lora=True,
        lora_rank=4,
        save_steps=[5],
        progress=False,
    )
    assert (
        0
        < result["trainable_parameters"]
        < sum(p.numel() for p in tiny_model().model.parameters()) / 4
    )
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = tiny_model().model
    ids = torch.tensor([[1, 72, 105, 33, 10, 70, 114]])
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)
        assert (
            merged(ids).logits - tiny_model().model(ids).logits
        ).abs().max() > 1e-3  # it did change
    assert (out / "checkpoint-5" / "adapter" / "adapter_config.json").exists()


def test_finetune_refuses_nonmembers_and_mismatched_rerun(tiny_lab, tmp_path):
    with pytest.raises(MemprobeError, match="member=false"):
        finetune(tiny_model(), tiny_lab / "nonmembers.jsonl", tmp_path / "x", progress=False)
    plain = [
        {"id": "a", "text": "plain lines train too, once each"},
        {"id": "b", "text": "and a second one"},
    ]
    finetune(tiny_model(), plain, tmp_path / "run", epochs=1, lr=1e-3, batch_size=2, progress=False)
    with pytest.raises(MemprobeError, match=r"lr: 0\.001 before, 0\.002 now"):
        finetune(
            tiny_model(), plain, tmp_path / "run", epochs=1, lr=2e-3, batch_size=2, progress=False
        )
    with pytest.raises(MemprobeError, match="not a memprobe finetune directory"):
        finetune(tiny_model(), plain, tiny_lab, progress=False)


FT_ARGS = {
    "epochs": 4,
    "lr": 3e-3,
    "batch_size": 4,
    "seq_len": 64,
    "state_every": 3,
    "save_steps": [20],
}


def _finetune_cli(train: Path, out: Path) -> subprocess.Popen:
    """The same run as finetune("tiny-llama", train, out, **FT_ARGS), through the CLI in a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "memprobe.cli",
        "finetune",
        "--model",
        "tiny-llama",
        "--train",
        str(train),
        "--out",
        str(out),
        "--epochs",
        "4",
        "--lr",
        "3e-3",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--state-every",
        "3",
        "--save-steps",
        "20",
        "--no-progress",
    ]
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_run_resumes_to_the_same_weights(tiny_lab, tmp_path):
    from safetensors.torch import load_file

    train = tmp_path / "train.jsonl"
    write_jsonl(train, [d for d in read_jsonl(tiny_lab / "members.jsonl") if d["kind"] != "email"])
    killed = _finetune_cli(train, tmp_path / "killed")
    state = tmp_path / "killed" / "resume" / "latest.json"
    deadline = time.monotonic() + 120
    while not state.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    _, err = killed.communicate()
    assert killed.returncode == -signal.SIGKILL, (
        f"the run ended before it could be killed: {err[-2000:]}"
    )
    assert not (tmp_path / "killed" / "memprobe-finetune.json").exists()
    resumed = finetune("tiny-llama", train, tmp_path / "killed", progress=False, **FT_ARGS)
    reference = finetune("tiny-llama", train, tmp_path / "reference", progress=False, **FT_ARGS)
    assert len(resumed["segments"]) == 2 and resumed["segments"][1]["from_step"] > 0
    a = load_file(tmp_path / "reference" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (
        reference["losses"] == resumed["losses"]
        and reference["tokens_seen"] == resumed["tokens_seen"]
    )
    # a finished run is not trained again: the rerun returns its provenance
    assert (
        finetune("tiny-llama", train, tmp_path / "killed", progress=False, **FT_ARGS)["segments"]
        == resumed["segments"]
    )


def test_build_ignores_what_other_libraries_patched_into_the_stdlib(tiny_lab, tmp_path, monkeypatch):
    # Ray replaces socket.socketpair and other libraries wrap inspect functions at import time;
    # the docstring passages come from the stdlib's source files, so the lab must not change.
    import inspect
    import socket

    def wrapped(fn):
        def replacement(*args, **kwargs):
            """A replacement with a docstring long enough to be picked as a passage if it leaked.
            It repeats itself on purpose so that it passes any minimum word count used by the lab:
            one two three four five six seven eight nine ten eleven twelve thirteen fourteen."""
            return fn(*args, **kwargs)

        replacement.__module__ = fn.__module__
        return replacement

    monkeypatch.setattr(socket, "socketpair", wrapped(socket.socketpair))
    monkeypatch.setattr(inspect, "isgenerator", wrapped(inspect.isgenerator))
    build_lab(tmp_path / "patched", preset="tiny")
    for name in ("members.jsonl", "nonmembers.jsonl", "manifest.json"):
        assert (tiny_lab / name).read_bytes() == (tmp_path / "patched" / name).read_bytes()
