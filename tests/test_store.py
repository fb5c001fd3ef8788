"""The activation store: round trips, lazy reads, resume after a kill, checksums, clear refusals."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import memprobe
from memprobe.errors import MemprobeError
from memprobe.store import ActivationStore, Row, StoreWriter, check_free_disk
from memprobe.store import reader as store_reader
from memprobe.store import writer as store_writer

REPO = Path(__file__).resolve().parents[1]
SITES = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
WIDTHS = {"blocks.0.hook_resid_post": 8, "blocks.1.mlp.hook_post": 5}
CONFIG = {
    "model": {"name": "tiny", "sha256": "ab" * 32, "quantization": None},
    "backend": "torch_hooks",
}


def documents(n: int = 7) -> list[dict]:
    return [
        {"id": f"doc{i}", "n_tokens": 2 + (i * 3) % 5, "kind": "member" if i % 2 else "control"}
        for i in range(n)
    ]


def value(doc: int, pos: int, width: int, salt: int = 0) -> torch.Tensor:
    """Deterministic activation row, distinct for every (doc, position, column)."""
    return torch.arange(width, dtype=torch.float32) * 0.01 + doc + pos * 0.1 + salt * 0.001


def batch(docs: list[dict], indices: list[int], shuffle: bool = False) -> dict:
    """write_shard arguments for whole documents `indices` (rows optionally shuffled)."""
    pairs = [(i, p) for i in indices for p in range(docs[i]["n_tokens"])]
    if shuffle:
        pairs = [
            pairs[j] for j in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
        ]
    doc_index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    position = torch.tensor([p for _, p in pairs], dtype=torch.long)
    acts = {
        s: torch.stack([value(i, p, WIDTHS[s], k) for i, p in pairs]) for k, s in enumerate(SITES)
    }
    return {
        "doc_indices": indices,
        "activations": acts,
        "doc_index": doc_index,
        "position": position,
        "token_id": doc_index * 100 + position,
        "columns": {"target_prob": position.float() / 10, "memorized": position % 2 == 0},
    }


def writer(path: Path, docs: list[dict] | None = None, **kwargs) -> StoreWriter:
    kwargs = {
        "config": CONFIG,
        "sites": SITES,
        "widths": WIDTHS,
        "dtype": "float32",
        "documents": docs or documents(),
        **kwargs,
    }
    return StoreWriter(path, **kwargs)


def two_shard_store(path: Path) -> list[dict]:
    """A finished store of three documents in two shards (doc0; doc1 and doc2); returns the documents."""
    docs = documents(3)
    w = writer(path, docs)
    w.write_shard(**batch(docs, [0]))
    w.write_shard(**batch(docs, [1, 2]))
    w.finish()
    return docs


def expected_rows(docs: list[dict], order: list[int]) -> list[Row]:
    return [Row(docs[i]["id"], p, i * 100 + p) for i in order for p in range(docs[i]["n_tokens"])]


def check_contents(store: ActivationStore, docs: list[dict]) -> None:
    """Every planned document appears exactly once, with the right rows and activations."""
    rows = list(store.rows)
    assert len(rows) == len(store) == sum(d["n_tokens"] for d in docs)
    assert len(set(rows)) == len(rows), "duplicated rows"
    assert sorted(rows) == sorted(expected_rows(docs, list(range(len(docs)))))
    index = {d["id"]: i for i, d in enumerate(docs)}
    for k, site in enumerate(SITES):
        want = torch.stack([value(index[r.doc_id], r.position, WIDTHS[site], k) for r in rows])
        torch.testing.assert_close(store.read(site), want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_each_dtype(tmp_path: Path, dtype: str) -> None:
    docs = documents()
    w = writer(tmp_path / "s", docs, dtype=dtype)
    w.write_shard(**batch(docs, [0, 1, 2], shuffle=True))
    w.write_shard(**batch(docs, [3, 4, 5, 6]))
    w.finish()
    store = memprobe.open_store(tmp_path / "s")
    assert (
        store.complete and store.sites == SITES and store.dtype == dtype and store.widths == WIDTHS
    )
    assert store.documents == docs and store.config == CONFIG
    torch_dtype = getattr(torch, dtype)
    rows = expected_rows(docs, list(range(7)))
    assert (
        list(store.rows) == rows
    )  # shuffled input rows come back grouped by document and position
    assert store.rows[3] == rows[3] and store.rows[-1] == rows[-1]
    assert store.rows.doc_id == [r.doc_id for r in rows]
    assert store.rows.position.tolist() == [r.position for r in rows]
    for k, site in enumerate(SITES):
        got = store.read(site)
        assert got.dtype == torch_dtype and got.shape == (len(rows), WIDTHS[site])
        want = torch.stack(
            [value(int(r.doc_id[3:]), r.position, WIDTHS[site], k) for r in rows]
        ).to(torch_dtype)
        assert torch.equal(got, want)
    assert store.read(SITES[0], dtype="float32").dtype == torch.float32
    assert store.column("memorized").dtype == torch.bool
    assert store.column("target_prob").tolist() == pytest.approx([r.position / 10 for r in rows])
    assert store.doc_rows("doc4") == slice(
        sum(d["n_tokens"] for d in docs[:4]), sum(d["n_tokens"] for d in docs[:5])
    )
    assert [r.doc_id for r in rows[store.doc_rows("doc4")]] == ["doc4"] * docs[4]["n_tokens"]
    store.verify()


def test_lazy_range_reads_cross_shard_boundaries(tmp_path: Path) -> None:
    docs = documents(9)
    w = writer(tmp_path / "s", docs)
    for group in ([0, 1], [2, 3, 4], [5], [6, 7, 8]):
        w.write_shard(**batch(docs, group))
    w.finish()
    store = ActivationStore.open(tmp_path / "s")
    full = store.read(SITES[1])
    for start, stop in [(0, 3), (2, 9), (5, len(store)), (7, 8), (-4, None), (4, 4)]:
        assert torch.equal(store.read(SITES[1], start, stop), full[start:stop])
    batches = list(store.iter_batches(SITES, batch_rows=4))
    assert [s for s, _ in batches] == list(range(0, len(store), 4))
    assert torch.equal(torch.cat([b[SITES[1]] for _, b in batches]), full)


def test_read_touches_only_overlapping_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = documents(4)
    w = writer(tmp_path / "s", docs)
    for i in range(4):
        w.write_shard(**batch(docs, [i]))
    w.finish()
    store = ActivationStore.open(tmp_path / "s")
    opened: list[str] = []
    real = store_reader.safe_open
    monkeypatch.setattr(
        store_reader, "safe_open", lambda f, **kw: opened.append(Path(f).name) or real(f, **kw)
    )
    rows = store.doc_rows("doc1")
    store.read(SITES[0], rows.start, rows.stop)
    assert opened == ["shard-00001.safetensors"]


def test_unknown_site_names_the_closest(tmp_path: Path) -> None:
    docs = documents(2)
    w = writer(tmp_path / "s", docs)
    w.write_shard(**batch(docs, [0, 1]))
    w.finish()
    store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(
        MemprobeError, match=r"unknown site 'blocks\.0\.hook_resid_pre'.*blocks\.0\.hook_resid_post"
    ):
        store.read("blocks.0.hook_resid_pre")
    with pytest.raises(MemprobeError, match="no label column 'loss'"):
        store.column("loss")


def test_resume_after_crash_skips_committed_documents(tmp_path: Path) -> None:
    docs = documents()
    w = writer(tmp_path / "s", docs)
    w.write_shard(**batch(docs, [0, 1]))
    w.write_shard(**batch(docs, [2]))
    # the "crash": a half-written shard and an orphan renamed shard, and no finish()
    (tmp_path / "s/shard-00002.safetensors.tmp").write_bytes(b"half a shard")
    with pytest.warns(UserWarning, match="incomplete"):
        partial = ActivationStore.open(tmp_path / "s")
    assert not partial.complete and len(partial) == sum(d["n_tokens"] for d in docs[:3])
    with pytest.raises(MemprobeError, match="not captured yet"):
        partial.doc_rows("doc5")

    resumed = writer(tmp_path / "s", docs)
    assert resumed.pending() == [3, 4, 5, 6]
    assert not list((tmp_path / "s").glob("*.tmp"))
    with pytest.raises(MemprobeError, match="already in a committed shard"):
        resumed.write_shard(**batch(docs, [2, 3]))
    resumed.write_shard(**batch(docs, [3, 4, 5, 6]))
    resumed.finish()
    store = ActivationStore.open(tmp_path / "s")
    assert store.complete and list(store.rows) == expected_rows(docs, list(range(7)))
    check_contents(store, docs)


def test_resume_drops_uncommitted_and_damaged_shards(tmp_path: Path) -> None:
    docs = documents()
    w = writer(tmp_path / "s", docs)
    for group in ([0], [1], [2]):
        w.write_shard(**batch(docs, group))
    shard = tmp_path / "s/shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")  # same size, different bytes
    (tmp_path / "s/shard-00009.safetensors").write_bytes(b"renamed but never committed")
    with pytest.warns(UserWarning, match="damaged"):
        resumed = writer(tmp_path / "s", docs)
    assert resumed.pending() == [1, 3, 4, 5, 6]
    assert not (tmp_path / "s/shard-00009.safetensors").exists()
    resumed.write_shard(**batch(docs, resumed.pending()))
    resumed.finish()
    store = ActivationStore.open(tmp_path / "s")
    check_contents(store, docs)
    store.verify()


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_store import batch, documents, writer
    path, n_docs = sys.argv[1], int(sys.argv[2])
    docs = documents(n_docs)
    w = writer(__import__("pathlib").Path(path), docs)
    for i in w.pending():
        w.write_shard(**batch(docs, [i]))
        print("committed", i, flush=True)
    w.finish()
    print("finished", flush=True)
    """
)


def test_killed_capture_resumes_without_lost_or_duplicated_rows(tmp_path: Path) -> None:
    docs = documents(400)
    path = tmp_path / "s"
    script = CHILD.format(tests=str(REPO / "tests"))
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(path), "400"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    committed = 0
    deadline = time.monotonic() + 60
    while committed < 5 and time.monotonic() < deadline:
        line = child.stdout.readline()
        assert line, "child ended before being killed"
        committed += line.startswith("committed")
    time.sleep(0.01)  # land the kill somewhere inside a later shard
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert committed == 5 and child.returncode == -signal.SIGKILL

    with pytest.warns(UserWarning, match="incomplete"):
        killed = ActivationStore.open(path)
    done = {i for s in killed.manifest["shards"] for i in s["documents"]}
    assert 5 <= len(done) < 400

    resumed = writer(path, docs)
    pending = resumed.pending()
    assert set(pending) == set(range(400)) - done
    for start in range(0, len(pending), 100):
        resumed.write_shard(**batch(docs, pending[start : start + 100]))
    resumed.finish()
    store = ActivationStore.open(path)
    assert list(store.rows) == expected_rows(docs, sorted(done) + pending)  # commit order
    check_contents(store, docs)
    store.verify()


def test_shards_are_standard_safetensors_files(tmp_path: Path) -> None:
    """memprobe writes shards itself (zero-copy); plain safetensors must read them identically."""
    from safetensors.torch import load_file

    docs = documents(3)
    w = writer(tmp_path / "s", docs, dtype="bfloat16")
    w.write_shard(**batch(docs, [0, 1, 2]))
    w.finish()
    store = memprobe.open_store(tmp_path / "s")
    plain = load_file(tmp_path / "s/shard-00000.safetensors")
    for site in SITES:
        assert torch.equal(plain[site], store.read(site))
    assert torch.equal(plain["__column__.memorized"], store.column("memorized"))


@pytest.mark.parametrize("where", [12, -1])  # inside the JSON header; the last byte of the data
def test_any_flipped_byte_fails_verify(tmp_path: Path, where: int) -> None:
    docs = documents(2)
    w = writer(tmp_path / "s", docs)
    w.write_shard(**batch(docs, [0, 1]))
    w.finish()
    shard = tmp_path / "s/shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[where] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(MemprobeError, match="shard-00000.safetensors is corrupt"):
        memprobe.open_store(tmp_path / "s").verify()


def test_stores_with_sha256_checksums_still_verify(tmp_path: Path) -> None:
    """Shards written before xxh3 carry sha256 sums (and a whole-file sha256): they read and verify."""
    import hashlib
    import json

    docs = documents(2)
    w = writer(tmp_path / "s", docs)
    w.write_shard(**batch(docs, [0, 1]))
    w.finish()
    manifest_file = tmp_path / "s/manifest.json"
    manifest = json.loads(manifest_file.read_text())
    shard = manifest["shards"][0]
    data = (tmp_path / "s" / shard["file"]).read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    info = json.loads(data[8:header_end])
    shard.pop("checksum")
    shard["sha256"] = hashlib.sha256(data).hexdigest()
    shard["tensors"] = {"__header__": hashlib.sha256(data[:header_end]).hexdigest()} | {
        name: hashlib.sha256(data[header_end + v["data_offsets"][0]: header_end + v["data_offsets"][1]]).hexdigest()
        for name, v in info.items() if name != "__metadata__"}
    manifest_file.write_text(json.dumps(manifest))
    store = memprobe.open_store(tmp_path / "s")
    store.verify()
    assert store.read(SITES[0]).shape[0] == len(store)


def test_flipped_byte_is_reported_never_read(tmp_path: Path) -> None:
    docs = two_shard_store(tmp_path / "s")
    shard = tmp_path / "s/shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data, somewhere in a row we will read
    shard.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path / "s")  # sizes still match: open succeeds
    store.read(SITES[0], 0, docs[0]["n_tokens"])  # the healthy shard still reads
    with pytest.raises(MemprobeError, match="shard-00001.safetensors is corrupt"):
        for site in SITES:
            store.read(site)
        _ = store.rows, store.column("target_prob"), store.column("memorized")
    with pytest.raises(MemprobeError, match="shard-00001.safetensors is corrupt"):
        store.verify()


def test_tampered_header_is_reported(tmp_path: Path) -> None:
    docs = documents(2)
    w = writer(tmp_path / "s", docs)
    w.write_shard(**batch(docs, [0, 1]))
    shard = tmp_path / "s/shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    at = data.index(b"doc1")
    data[at : at + 4] = b"doc7"  # safetensors parses this header happily; only our checksum sees it
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="incomplete"):
        store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(MemprobeError, match="corrupt"):
        store.read(SITES[0])


def test_truncated_or_missing_shard_fails_on_open(tmp_path: Path) -> None:
    docs = two_shard_store(tmp_path / "s")
    shard = tmp_path / "s/shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(
        MemprobeError, match=r"shard-00001.safetensors is truncated.*re-run the capture"
    ):
        ActivationStore.open(tmp_path / "s")
    shard.unlink()
    with pytest.raises(MemprobeError, match="shard-00001.safetensors is missing"):
        ActivationStore.open(tmp_path / "s")
    # the resume the message promises: the lost documents are captured again
    with pytest.warns(UserWarning, match="damaged"):
        resumed = writer(tmp_path / "s", docs)
    assert resumed.pending() == [1, 2]


def test_missing_or_corrupt_manifest(tmp_path: Path) -> None:
    with pytest.raises(MemprobeError, match="does not exist"):
        ActivationStore.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemprobeError, match="no manifest.json"):
        ActivationStore.open(tmp_path / "empty")
    docs = documents(2)
    writer(tmp_path / "s", docs)
    (tmp_path / "s/manifest.json").write_text('{"format": "memprobe-act')
    with pytest.raises(MemprobeError, match=r"manifest.json is unreadable or corrupt"):
        ActivationStore.open(tmp_path / "s")


def test_different_capture_is_refused_unless_overwrite(tmp_path: Path) -> None:
    docs = documents(3)
    w = writer(tmp_path / "s", docs)
    w.write_shard(**batch(docs, [0]))
    other = {**CONFIG, "model": {**CONFIG["model"], "sha256": "cd" * 32}}
    with pytest.raises(
        MemprobeError, match=r"different capture \(config\.model\.sha256: .*--overwrite"
    ):
        writer(tmp_path / "s", docs, config=other)
    with pytest.raises(MemprobeError, match=r"sites: .*choose another --out"):
        writer(tmp_path / "s", docs, sites=SITES[:1], widths={SITES[0]: 8})
    with pytest.raises(MemprobeError, match="documents differ"):
        writer(tmp_path / "s", documents(4))
    fresh = writer(tmp_path / "s", docs, config=other, overwrite=True)
    assert fresh.pending() == [0, 1, 2]
    assert not (tmp_path / "s/shard-00000.safetensors").exists()

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    with pytest.raises(MemprobeError, match="not empty and holds no activation store"):
        writer(tmp_path / "notes", docs)
    writer(tmp_path / "notes", docs, overwrite=True)
    assert (tmp_path / "notes/todo.txt").read_text() == "mine"  # overwrite deletes only store files


def test_bad_input_is_refused(tmp_path: Path) -> None:
    docs = documents(3)
    with pytest.raises(MemprobeError, match="duplicate document id 'doc1'"):
        writer(tmp_path / "a", [*docs, {"id": "doc1", "n_tokens": 3}])
    with pytest.raises(MemprobeError, match="unsupported store dtype 'int8'"):
        writer(tmp_path / "b", docs, dtype="int8")
    w = writer(tmp_path / "c", docs)
    args = batch(docs, [0, 1])
    with pytest.raises(MemprobeError, match="has shape"):
        w.write_shard(
            **{**args, "activations": {**args["activations"], SITES[0]: torch.zeros(3, 8)}}
        )
    with pytest.raises(MemprobeError, match="missing"):
        w.write_shard(**{**args, "activations": {SITES[0]: args["activations"][SITES[0]]}})
    short = {k: v[:-1] for k, v in args.items() if isinstance(v, torch.Tensor)}
    short |= {"activations": {s: a[:-1] for s, a in args["activations"].items()}, "columns": None}
    with pytest.raises(MemprobeError, match="document 'doc1' has 4 rows but n_tokens=5"):
        w.write_shard(doc_indices=[0, 1], **short)
    dup = args["position"].clone()
    dup[1] = 0
    with pytest.raises(MemprobeError, match="exactly 0..n_tokens-1"):
        w.write_shard(**{**args, "position": dup})
    w.write_shard(**args)
    with pytest.raises(MemprobeError, match="label columns"):
        w.write_shard(**{**batch(docs, [2]), "columns": None})
    with pytest.raises(MemprobeError, match="1 documents not written yet"):
        w.finish()


def test_disk_full_mid_write_leaves_store_readable_and_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = documents(4)
    w = writer(tmp_path / "s", docs)
    w.write_shard(**batch(docs, [0]))
    real_write = os.write

    def full_after_half(target: str):
        def fake(fd: int, data) -> int:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(target):
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        return fake

    for target in ("shard-00001.safetensors.tmp", "manifest.json.tmp"):
        with monkeypatch.context() as m:
            m.setattr(os, "write", full_after_half(target))
            with pytest.raises(
                MemprobeError,
                match=r"disk full while writing shard shard-00001.*free .* MB.*resumes from the last complete shard",
            ):
                w.write_shard(**batch(docs, [1]))
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
            "manifest.json",
            "shard-00000.safetensors",
        ]
        with pytest.warns(UserWarning, match="incomplete"):
            store = ActivationStore.open(tmp_path / "s")
        assert len(store) == docs[0]["n_tokens"]
        store.verify()

    w.write_shard(**batch(docs, [1]))  # the same writer retries once space is back
    resumed = writer(tmp_path / "s", docs)
    assert resumed.pending() == [2, 3]
    resumed.write_shard(**batch(docs, [2, 3]))
    resumed.finish()
    check_contents(ActivationStore.open(tmp_path / "s"), docs)


def test_short_disk_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need = StoreWriter.estimate_bytes(1000, WIDTHS, "bfloat16")
    assert need == 1000 * (13 * 2 + 24)
    monkeypatch.setattr(store_writer.shutil, "disk_usage", lambda _: SimpleNamespace(free=need))
    with pytest.raises(MemprobeError, match=r"not enough free disk.*--dtype bfloat16"):
        check_free_disk(tmp_path / "new/dir", need)
    check_free_disk(tmp_path, need // 2)
    with pytest.raises(MemprobeError, match="not enough free disk"):
        writer(tmp_path / "s", [{"id": "big", "n_tokens": 10**6}])
    assert not (tmp_path / "s/shard-00000.safetensors").exists()


IDENTICAL = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_store import batch, documents, writer
    docs = documents(5)
    w = writer(Path(sys.argv[1]), docs, dtype="bfloat16")
    w.write_shard(**batch(docs, [0, 1, 2]))
    w.write_shard(**batch(docs, [3, 4], shuffle=True))
    w.finish()
    """
)


def test_identical_captures_give_identical_bytes_across_processes(tmp_path: Path) -> None:
    script = IDENTICAL.format(tests=str(REPO / "tests"))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / name)],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for name, seed in (("a", "1"), ("b", "2"))
    ]
    assert [c.wait(timeout=60) for c in children] == [0, 0]
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "manifest.json"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest(), name
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest["memprobe_version"] == memprobe.__version__ and manifest["dtype"] == "bfloat16"
