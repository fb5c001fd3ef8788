"""Distributed jobs equal one process byte for byte: on Ray actors, after a worker crash, resumed,
under torchrun; and bad input fails clearly with nothing half-merged readable as valid."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import memprobe
from memprobe.capture import capture
from memprobe.distributed.job import EngineOptions, capture_job, label_job, mia_job
from memprobe.distributed.merge import merge_capture, unfinished
from memprobe.distributed.plan import PLAN_FILE, capture_plan, write_plan
from memprobe.distributed.shard import FAULT_ENV, part_dir, run_entry
from memprobe.errors import MemprobeError
from memprobe.jsonl import read_jsonl, write_jsonl
from memprobe.labels import label_documents
from memprobe.mia.attacks import score_texts
from memprobe.models import load_model, tiny_model

SITES = "blocks.*.hook_resid_post,blocks.0.hook_mlp_out"
SIZES = {"batch_tokens": 256, "entry_tokens": 600}  # 24 documents: 4-5 entries of 2-3 batches each
REPO = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def store_bytes(path: Path) -> dict[str, bytes]:
    """The files that make a store (manifest and shards); run provenance lives beside them."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.name == "manifest.json" or p.name.startswith("shard-")}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny model saved as an HF directory (workers load it by path) and a 24-document input."""
    root = tmp_path_factory.mktemp("distributed")
    tiny = tiny_model("llama")
    tiny.model.save_pretrained(root / "model")
    tiny.tokenizer.save_pretrained(root / "model")
    rnd = random.Random(0)
    docs = [{"id": f"doc-{i:02d}", "text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 40))),
             "kind": "even" if i % 2 == 0 else "odd"} for i in range(24)]
    write_jsonl(root / "input.jsonl", docs)
    model = str(root / "model")
    loaded = load_model(model)
    golden = root / "golden"
    capture(loaded, read_jsonl(root / "input.jsonl"), SITES, golden, batch_tokens=SIZES["batch_tokens"],
            progress=False)
    plan = capture_plan(loaded, model, root / "input.jsonl", SITES, **SIZES)
    assert len(plan["entries"]) >= 4 and len(memprobe.open_store(golden).manifest["shards"]) > 8
    return {"root": root, "model": model, "input": root / "input.jsonl", "loaded": loaded,
            "golden": store_bytes(golden), "entries": list(range(len(plan["entries"])))}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_capture(job, out: Path, **kwargs):
    return capture_job(job["model"], job["input"], SITES, out, **SIZES, **kwargs)


def test_one_process_job_twice_is_the_bytes_of_a_plain_capture(job, tmp_path):
    first, report = run_capture(job, tmp_path / "a", loaded=job["loaded"])
    second, _ = run_capture(job, tmp_path / "b", loaded=job["loaded"])
    plan = json.loads((tmp_path / "a" / PLAN_FILE).read_text())
    assert len(first.manifest["shards"]) > len(plan["entries"]) >= 4
    assert all(len(e["doc_ids"]) >= 1 and e["n_tokens"] <= e["budget_tokens"] for e in plan["entries"])
    assert sorted(i for e in plan["entries"] for i in e["doc_ids"]) == sorted(d["id"] for d in first.documents)
    assert report.computed == job["entries"]
    assert store_bytes(tmp_path / "a") == store_bytes(tmp_path / "b") == job["golden"]
    assert not (tmp_path / "a" / "parts").exists()
    memprobe.open_store(tmp_path / "a").verify()
    again, rerun = run_capture(job, tmp_path / "a", loaded=job["loaded"])  # finished: nothing recomputed
    assert rerun.computed == [] and rerun.skipped == job["entries"]


def test_token_stats_in_a_job_are_the_bytes_of_a_plain_capture(job, tmp_path):
    capture(job["loaded"], read_jsonl(job["input"]), SITES, tmp_path / "plain", batch_tokens=SIZES["batch_tokens"],
            token_stats=True, progress=False)
    store, _ = run_capture(job, tmp_path / "job", token_stats=True, loaded=job["loaded"])
    assert store.columns and store_bytes(tmp_path / "job") == store_bytes(tmp_path / "plain")
    assert store_bytes(tmp_path / "job") != job["golden"]


def _worker_pids(out: Path) -> dict[int, int]:
    return {json.loads(p.read_text())["entry"]: json.loads(p.read_text())["pid"]
            for p in (out / "runs").glob("entry-*.json")}


def test_ray_two_actors_match_one_process(job, ray_cluster, tmp_path):
    store, report = run_capture(job, tmp_path / "ray", options=EngineOptions(engine="ray", workers=2))
    assert store_bytes(tmp_path / "ray") == job["golden"]
    assert report.computed == job["entries"]
    pids = _worker_pids(tmp_path / "ray")
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert {r["pid"] for r in report.records} == set(pids.values())

    labels, _ = label_job(job["model"], job["input"], tmp_path / "ray-labels.jsonl", entry_tokens=600,
                          options=EngineOptions(engine="ray", workers=1))
    local, _ = label_job(job["model"], job["input"], tmp_path / "labels.jsonl", entry_tokens=600,
                         loaded=job["loaded"])
    assert labels.read_bytes() == local.read_bytes()
    records = read_jsonl(labels)
    whole = label_documents(job["loaded"], read_jsonl(job["input"]))  # one call: other batch padding
    assert [r["id"] for r in records] == [r["id"] for r in whole]
    for got, want in zip(records, whole, strict=True):
        assert got["token_ids"] == want["token_ids"] and got["memorized"] == want["memorized"]
        np.testing.assert_allclose(np.array(got["target_prob"][1:]), np.array(want["target_prob"][1:]), atol=1e-5)


def test_ray_worker_killed_mid_entry_is_retried_to_the_same_bytes(job, ray_cluster, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, f"{marker}:1")  # entry 1's worker exits after its first batch
    store, report = run_capture(job, tmp_path / "ray", options=EngineOptions(engine="ray", workers=1))
    assert marker.exists(), "the fault never fired: the test would not test a crash"
    crashed_pid = int(marker.read_text())
    assert _worker_pids(tmp_path / "ray")[1] != crashed_pid  # a restarted actor finished entry 1
    assert report.computed == job["entries"]
    assert store_bytes(tmp_path / "ray") == job["golden"]


def test_resume_recomputes_exactly_the_unfinished_entries(job, tmp_path):
    out = tmp_path / "resume"
    plan = capture_plan(job["loaded"], job["model"], job["input"], SITES, **SIZES)
    write_plan(out, plan)
    for i in (0, 3):
        run_entry(out, plan, i)
    # Entry 1 killed mid-entry in a separate process: one batch committed, no done marker.
    code = (f"from memprobe.distributed.job import capture_job\n"
            f"capture_job({job['model']!r}, {str(job['input'])!r}, {SITES!r}, {str(out)!r}, "
            f"batch_tokens={SIZES['batch_tokens']}, entry_tokens={SIZES['entry_tokens']})\n")
    env = {**os.environ, FAULT_ENV: f"{tmp_path / 'crashed'}:1"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 1, killed.stderr[-2000:]
    rest = [i for i in job["entries"] if i not in (0, 3)]
    assert unfinished(out, plan) == rest
    assert len(json.loads((part_dir(out, 1) / "manifest.json").read_text())["shards"]) == 1
    kept = {p.name: p.stat().st_ino for i in (0, 3) for p in part_dir(out, i).glob("shard-*")}
    with pytest.raises(MemprobeError, match=f"{len(rest)} of {len(job['entries'])} plan entries are not finished"):
        merge_capture(out, plan)
    assert not (out / "manifest.json").exists()
    store, report = run_capture(job, out, loaded=job["loaded"])
    assert report.computed == rest and report.skipped == [0, 3]
    assert store_bytes(out) == job["golden"]
    inodes = {p.stat().st_ino for p in out.glob("shard-*")}
    assert set(kept.values()) <= inodes  # the finished entries' shards were reused, not rewritten


def test_torchrun_two_ranks_match_one_process(job, tmp_path):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "memprobe.distributed.torchrun", "capture", "--model", job["model"], "--input",
           str(job["input"]), "--sites", SITES, "--out", str(out), "--batch-tokens", "256",
           "--entry-tokens", "600"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_bytes(out) == job["golden"]
    (run,) = [json.loads(p.read_text()) for p in (out / "runs").glob("run-*.json")]
    assert run["engine"] == "torchrun x2" and run["computed"] == job["entries"]
    assert len({pid for _, pid in run["workers"]}) == 2


def test_mia_job_scores_every_document_once_in_input_order(job, tmp_path):
    path, report = mia_job(job["model"], job["input"], tmp_path / "mia.jsonl", entry_tokens=300, loaded=job["loaded"])
    again, _ = mia_job(job["model"], job["input"], tmp_path / "again.jsonl", entry_tokens=300, loaded=job["loaded"])
    assert len(report.computed) > 4 and path.read_bytes() == again.read_bytes()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    whole = score_texts(job["loaded"], read_jsonl(job["input"]))
    assert [r["id"] for r in records] == [r["id"] for r in whole]
    for got, want in zip(records, whole, strict=True):
        assert got["scores"].keys() == want["scores"].keys()
        # other batch companions, other padding: float noise, amplified by min-k%++'s 1/sigma
        np.testing.assert_allclose(list(got["scores"].values()), list(want["scores"].values()), rtol=1e-4)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_job_published_to_an_fsspec_url_resumes_elsewhere(job, tmp_path, scheme):
    import fsspec

    from memprobe.distributed.remote import MARKER, fetch, published
    from memprobe.distributed.shard import part_url

    url = f"memory://bucket/{tmp_path.name}/store" if scheme == "memory" else f"file://{tmp_path}/remote/store"
    plan = capture_plan(job["loaded"], job["model"], job["input"], SITES, **SIZES, publish=url)
    write_plan(tmp_path / "machine-a", plan)
    for i in (0, 2):  # a first machine finishes two entries, then is lost
        run_entry(tmp_path / "machine-a", plan, i)
    assert published(part_url(url, 0)) is not None and published(part_url(url, 1)) is None
    assert published(url) is None
    store, report = capture_job(job["model"], job["input"], SITES, url, **SIZES, loaded=job["loaded"],
                                work_dir=tmp_path / "machine-b")
    assert report.skipped == [0, 2] and report.computed == [i for i in job["entries"] if i not in (0, 2)]
    assert store_bytes(tmp_path / "machine-b") == job["golden"]
    copy = fetch(url, tmp_path / "reader")
    assert store_bytes(copy) == job["golden"]
    memprobe.open_store(copy).verify()
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/shard-00001.safetensors", b"damaged")
    with pytest.raises(MemprobeError, match="does not match its completion marker"):
        fetch(url, tmp_path / "reader-2")
    fs.rm(f"{root}/{MARKER}")
    with pytest.raises(MemprobeError, match="not completely published"):
        fetch(url, tmp_path / "reader-3")


def test_a_plan_that_does_not_match_the_directory_is_refused(job, tmp_path):
    out = tmp_path / "job"
    run_capture(job, out, loaded=job["loaded"])
    with pytest.raises(MemprobeError, match="plan of a different job"):
        capture_job(job["model"], job["input"], "blocks.0.hook_resid_post", out, **SIZES, loaded=job["loaded"])
    plan = json.loads((out / PLAN_FILE).read_text())
    plan["entries"][0]["doc_ids"].reverse()
    (out / PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(MemprobeError, match="does not match its own hash"):
        run_capture(job, out, loaded=job["loaded"])
    plain = tmp_path / "plain"
    capture(job["loaded"], read_jsonl(job["input"]), SITES, plain, progress=False)
    with pytest.raises(MemprobeError, match="holds no distributed plan"):
        run_capture(job, plain, loaded=job["loaded"])


def test_a_damaged_part_is_recomputed_and_never_merged(job, tmp_path):
    out = tmp_path / "job"
    plan = capture_plan(job["loaded"], job["model"], job["input"], SITES, **SIZES)
    write_plan(out, plan)
    for entry in plan["entries"]:
        run_entry(out, plan, entry["index"])
    shard = sorted(part_dir(out, 2).glob("shard-*"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MemprobeError, match="damaged"):
        merge_capture(out, plan)
    with pytest.raises(MemprobeError, match="no manifest.json"):
        memprobe.open_store(out)
    store, report = run_capture(job, out, loaded=job["loaded"])
    assert report.computed == [2]
    assert store_bytes(out) == job["golden"]


def test_worker_that_cannot_load_the_model_fails_clearly(job, ray_cluster, tmp_path):
    from memprobe.distributed.ray_runner import run_with_ray

    model = tmp_path / "model"
    model.mkdir()
    for f in Path(job["model"]).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    loaded = load_model(str(model))
    out = tmp_path / "job"
    plan = capture_plan(loaded, str(model), job["input"], SITES, **SIZES)
    write_plan(out, plan)
    (model / "config.json").unlink()  # the workers' view of the model is broken
    with pytest.raises(MemprobeError, match="cannot load model"):
        run_with_ray(out, [0, 1], workers=1)
    with pytest.raises(MemprobeError, match="not finished"):
        merge_capture(out, plan)
    with pytest.raises(MemprobeError):
        memprobe.open_store(out)


def test_cli_engines_and_an_unreachable_address(job, tmp_path, capsys):
    from memprobe.cli import main

    out = tmp_path / "cli"
    args = ["capture", "--model", job["model"], "--input", str(job["input"]), "--sites", SITES,
            "--out", str(out), "--batch-tokens", "256", "--entry-tokens", "600"]
    assert main([*args, "--engine", "process"]) == 0
    assert store_bytes(out) == job["golden"]
    assert f"{len(job['entries'])} entries computed" in capsys.readouterr().out
    started = time.perf_counter()
    code = main([*args[:-6], "--out", str(tmp_path / "far"), "--engine", "ray", "--address", "127.0.0.1:1"])
    assert code == 2 and time.perf_counter() - started < 30
    assert "cannot reach a Ray cluster at --address 127.0.0.1:1" in capsys.readouterr().err
    assert main(["capture", "--model", job["model"], "--sites", SITES, "--out", str(tmp_path / "x"),
                 "--engine", "process"]) == 2
    assert "--engine needs --input" in capsys.readouterr().err
    labels = tmp_path / "labels.jsonl"
    assert main(["label", "--model", job["model"], "--input", str(job["input"]), "--output", str(labels),
                 "--engine", "process", "--entry-tokens", "600"]) == 0
    reference, _ = label_job(job["model"], job["input"], tmp_path / "lib.jsonl", entry_tokens=600,
                             loaded=job["loaded"])
    assert labels.read_bytes() == reference.read_bytes()


def test_threads_are_fixed_from_the_plan(job, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_capture(job, tmp_path / "t", loaded=job["loaded"])
        assert torch.get_num_threads() == 1  # the shard function set the plan's thread count
        record = json.loads(next((tmp_path / "t" / "runs").glob("entry-*.json")).read_text())
        assert record["torch_threads"] == 1 and record["device"] == "cpu" and record["dtype"] == "float32"
    finally:
        torch.set_num_threads(before)
