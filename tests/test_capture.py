"""Capture end to end: rows match the backend, resume after a real kill, and every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import memprobe
from memprobe.backends import make_backend
from memprobe.capture import capture, pad_batch, pad_id
from memprobe.errors import MemprobeError
from memprobe.models import load_model

DOCS = [{"id": f"doc-{i}", "text": f"Line {i}: " + "the rain in Spain falls mainly on the plain. " * (1 + i % 4),
         "kind": "test"} for i in range(12)]


def test_rows_are_the_backend_activations_of_each_document(tiny, tmp_path):
    store = capture(tiny, DOCS, "blocks.*.hook_resid_post", tmp_path / "s", batch_tokens=300, progress=False)
    assert store.complete and len(store.manifest["shards"]) > 1  # several batches, several shards
    doc = DOCS[5]
    ids = tiny.encode(doc["text"])
    rows = store.doc_rows(doc["id"])
    assert store.rows.token_id[rows].tolist() == ids
    assert store.rows.position[rows].tolist() == list(range(len(ids)))
    x, m = pad_batch([ids], pad_id(tiny))
    ref = make_backend("hooks", tiny).run(x, m, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"][0]
    torch.testing.assert_close(store.read("blocks.1.hook_resid_post")[rows], ref)
    assert len(store) == sum(len(tiny.encode(d["text"])) for d in DOCS)


def test_bfloat16_store_and_label_columns(tiny, tmp_path):
    cols = {"memorized": {d["id"]: [i % 2 for i in range(len(tiny.encode(d["text"])))] for d in DOCS}}
    store = capture(tiny, DOCS, "blocks.0.mlp.hook_post", tmp_path / "s", dtype="bfloat16",
                    token_columns=cols, progress=False)
    assert store.read("blocks.0.mlp.hook_post").dtype == torch.bfloat16
    rows = store.doc_rows("doc-3")
    assert store.column("memorized")[rows].tolist() == [float(i % 2) for i in range(rows.stop - rows.start)]


def test_label_columns_must_match_tokens(tiny, tmp_path):
    with pytest.raises(MemprobeError, match="same texts with the same model"):
        capture(tiny, DOCS[:2], "blocks.0.hook_resid_post", tmp_path / "s",
                token_columns={"memorized": {"doc-0": [1], "doc-1": [0]}}, progress=False)


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memprobe.cli", *args], capture_output=True, text=True, **kw)


def test_killed_capture_resumes_without_lost_or_duplicated_rows(tmp_path):
    docs = tmp_path / "docs.jsonl"
    many = [{"id": f"d{i:03d}", "text": "Permission is hereby granted, free of charge, " * (2 + i % 5)} for i in range(60)]
    docs.write_text("".join(json.dumps(d) + "\n" for d in many))
    sites = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"
    args = ["capture", "--model", "tiny-llama", "--input", str(docs), "--sites", sites, "--batch-tokens", "200"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "memprobe.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a few shards are committed
        if manifest.exists() and len(json.loads(manifest.read_text() or "{}").get("shards", [])) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads(manifest.read_text())
    assert not partial["complete"] and 3 <= len(partial["shards"]) < 30
    assert _cli([*args, "--out", str(out)]).returncode == 0  # resume
    clean = capture(load_model("tiny-llama"), many, sites, tmp_path / "clean", batch_tokens=200, progress=False)
    resumed = memprobe.open_store(out)
    resumed.verify()
    assert resumed.complete and len(resumed) == len(clean)
    keys = list(zip(resumed.rows.doc_id, resumed.rows.position.tolist(), strict=True))
    assert len(set(keys)) == len(keys)  # no duplicated rows
    assert sorted(keys) == sorted(zip(clean.rows.doc_id, clean.rows.position.tolist(), strict=True))
    for doc in ("d000", "d037", "d059"):
        for site in clean.sites:
            torch.testing.assert_close(resumed.read(site)[resumed.doc_rows(doc)], clean.read(site)[clean.doc_rows(doc)])


@pytest.mark.parametrize(("text", "message"), [("", "empty text"), ("   ", "empty text")])
def test_empty_text_is_refused_by_id(tiny, tmp_path, text, message):
    with pytest.raises(MemprobeError, match=rf"'bad'.*{message}"):
        capture(tiny, [{"id": "bad", "text": text}], "blocks.0.hook_resid_post", tmp_path / "s", progress=False)


def test_text_longer_than_context_is_refused_or_truncated(tiny, tmp_path):
    long = [{"id": "long", "text": "abc " * 600}]  # 2401 byte tokens > 2048 context
    with pytest.raises(MemprobeError, match="refuses rather than chunk.*--truncate"):
        capture(tiny, long, "blocks.0.hook_resid_post", tmp_path / "a", progress=False)
    store = capture(tiny, long, "blocks.0.hook_resid_post", tmp_path / "b", truncate=True, progress=False)
    assert len(store) == 2048 and store.documents[0]["truncated_from"] == 2401


def test_different_capture_in_out_dir_is_refused(tiny, tmp_path):
    capture(tiny, DOCS[:3], "blocks.0.hook_resid_post", tmp_path / "s", progress=False)
    with pytest.raises(MemprobeError, match="different capture.*--overwrite"):
        capture(tiny, DOCS[:3], "blocks.1.hook_resid_post", tmp_path / "s", progress=False)
    other = load_model("tiny-gemma3")
    with pytest.raises(MemprobeError, match="different capture"):
        capture(other, DOCS[:3], "blocks.0.hook_resid_post", tmp_path / "s", progress=False)


def test_cli_errors_are_one_line_with_a_fix(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"id": "a", "text": "hello"}\n{"id": "b", "text": \n')
    r = _cli(["capture", "--model", "tiny-llama", "--input", str(docs), "--sites", "blocks.0.hook_resid_post", "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "d.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    docs.write_text('{"id": "a", "text": "hello"}\n')
    r = _cli(["capture", "--model", "tiny-llama", "--input", str(docs), "--sites", "blocks.0.hook_resid_psot", "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "blocks.0.hook_resid_post" in r.stderr
    r = _cli(["capture", "--model", "smollm2-13m", "--input", str(docs), "--sites", "x", "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and "Did you mean smollm2-135m" in r.stderr


def test_info_reports_corruption(tiny, tmp_path):
    capture(tiny, DOCS[:3], "blocks.0.hook_resid_post", tmp_path / "s", progress=False)
    shard = next(Path(tmp_path / "s").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = _cli(["info", str(tmp_path / "s"), "--verify"])
    assert r.returncode == 2 and shard.name in r.stderr


def test_cli_capture_with_token_stats_stores_the_labels_inputs(tmp_path):
    from memprobe.labels import token_labels, token_labels_from_store
    from memprobe.token_stats import STAT_COLUMNS

    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS[:4]))
    out = tmp_path / "s"
    r = _cli(["capture", "--model", "tiny-llama", "--input", str(docs), "--sites", "blocks.0.hook_resid_post",
              "--out", str(out), "--token-stats"])
    assert r.returncode == 0, r.stderr
    store = memprobe.open_store(out)
    assert set(STAT_COLUMNS) <= set(store.columns)
    tiny = load_model("tiny-llama")
    one = token_labels_from_store(store, [d["id"] for d in DOCS[:4]])
    two = token_labels(tiny.model, [tiny.encode(d["text"]) for d in DOCS[:4]])
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(torch.from_numpy(a.target_prob), torch.from_numpy(b.target_prob), equal_nan=True,
                                   rtol=0, atol=1e-6)
