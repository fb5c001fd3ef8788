"""memprobe.io.atomic: a file or directory is the old one or all of the new one, even after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memprobe.io import atomic_write, publish_directory, remove_staged, staged_directory
from memprobe.jsonl import read_jsonl, write_jsonl


def test_chunks_of_text_bytes_and_buffers_are_written_back_to_back(tmp_path: Path) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB: written without gathering
    chunks = ["héllo ", b"small ", memoryview(big), *(f"{i}," for i in range(10_000))]
    atomic_write(tmp_path / "f", chunks)
    expected = "héllo ".encode() + b"small " + big + "".join(f"{i}," for i in range(10_000)).encode()
    assert (tmp_path / "f").read_bytes() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "docs.jsonl"
    write_jsonl(target, [{"id": "a", "text": "old"}])

    def records():
        yield {"id": "b", "text": "new"}
        raise RuntimeError("the producer failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        write_jsonl(target, records())
    assert read_jsonl(target) == [{"id": "a", "text": "old"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_sigkill_mid_write_leaves_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "result.bin"
    atomic_write(target, b"old")
    script = textwrap.dedent(f"""
        import time
        from memprobe.io import atomic_write

        def slow():
            for _ in range(10_000):
                yield b"x" * (1 << 17)  # large chunks: each is written at once
                time.sleep(0.01)

        atomic_write({str(target)!r}, slow())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    temp = target.with_name(target.name + ".tmp")
    deadline = time.monotonic() + 60
    while not (temp.exists() and temp.stat().st_size > 1 << 20):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old"
    remove_staged(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]


def test_staged_directory_publishes_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), staged_directory(target) as staged:
        (staged / "config.json").write_text("{}")
        raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp directory

    with staged_directory(target) as staged:
        (staged / "sub").mkdir()
        (staged / "sub" / "weights").write_bytes(b"w1")
    assert (target / "sub" / "weights").read_bytes() == b"w1"

    with pytest.raises(FileExistsError), staged_directory(target) as staged:
        (staged / "weights").write_bytes(b"w2")
    assert (target / "sub" / "weights").read_bytes() == b"w1"  # a non-empty target is kept

    with staged_directory(target, replace=True) as staged:
        (staged / "weights").write_bytes(b"w2")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old one was deleted, not left aside


def test_publish_onto_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("a")
    publish_directory(tmp_path / "new", tmp_path / "out")
    assert (tmp_path / "out" / "a").read_text() == "a" and not (tmp_path / "new").exists()
