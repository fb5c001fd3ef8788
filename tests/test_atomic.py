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


def test_a_truncated_jsonl_line_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    """Documents and MIA scores read through one parser: a half-written line is an error, not data."""
    from memprobe.cli.mia import read_scores
    from memprobe.errors import MemprobeError

    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"id": "a", "scores": {"loss": 1.0}}\n\n{"id": "b", "scores": {"lo')
    with pytest.raises(MemprobeError, match=r"scores\.jsonl:3: not valid JSON"):
        read_scores(str(scores))
    scores.write_text('{"id": "a", "scores": {"loss": 1.0}}\n["not", "a", "record"]\n')
    with pytest.raises(MemprobeError, match=r"scores\.jsonl:2: expected \{'id': str, 'scores'"):
        read_scores(str(scores))
    scores.write_text('{"id": "a", "scores": {"loss": 1.0}}\n\n')
    assert read_scores(str(scores)) == [{"id": "a", "scores": {"loss": 1.0}}]
    with pytest.raises(MemprobeError, match="does not exist"):
        read_scores(str(tmp_path / "missing.jsonl"))


# --- every file kind memprobe writes goes through the one policy -------------------------------------
# Each test makes the underlying library call write part of its output and then fail (a full disk, a
# kill): the previous file must be intact and no temp file left behind.


def _litter(directory: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_json_failing_mid_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import memprobe.io.atomic as atomic
    from memprobe.results import write_json

    target = tmp_path / "result.json"
    write_json(target, {"auc": 0.9})
    real = atomic._write_all

    def half_then_fail(fd: int, data: bytearray | memoryview) -> None:
        real(fd, memoryview(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_json(target, {"auc": 0.5, "pad": "x" * 10_000})
    assert target.read_text() == '{\n  "auc": 0.9\n}\n' and _litter(tmp_path, "result.json") == []


def _half_then_fail(write):  # noqa: ANN001, ANN202
    """A library call that writes half of what `write` would to its path argument, then fails."""
    def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        path = next(a for a in args if isinstance(a, (str, Path)))
        write(*args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")
    return call


def test_safetensors_failing_mid_write_keeps_the_old_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from safetensors.torch import save_file

    import memprobe.probes.artefact as artefact
    from memprobe.probes.estimators import LogisticProbe

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)), np.arange(40) % 2
    old = LogisticProbe(alpha=1e-2).fit(X + y[:, None], y)
    artefact.save_probe(tmp_path, old, site="blocks.0.hook_resid_post", model_info={"name": "m"}, training={})
    artefact.save_directions(tmp_path, {"blocks.0.hook_resid_post": old.coef_[0]})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = LogisticProbe(alpha=1e-2).fit(X - y[:, None], y)
    monkeypatch.setattr(artefact, "save_file", _half_then_fail(save_file))
    with pytest.raises(OSError, match="No space"):
        artefact.save_probe(tmp_path, new, site="blocks.0.hook_resid_post", model_info={"name": "m"}, training={})
    with pytest.raises(OSError, match="No space"):
        artefact.save_directions(tmp_path, {"blocks.0.hook_resid_post": new.coef_[0]})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing changed, nothing added
    loaded, _ = artefact.load_probe(tmp_path)
    np.testing.assert_array_equal(loaded.coef_, old.coef_.astype(np.float32))  # stored as float32


def test_a_checkpoint_failing_mid_write_resumes_to_the_uninterrupted_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save of the optimiser state fails half-way: the previous state.pt is what resume reads, and
    a temp file left by a kill (no clean-up ran) is never taken for a snapshot."""
    import torch

    from memprobe.train.classifier import TrainConfig, mlp, train_classifier

    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2
    config = TrainConfig(epochs=2, batch_size=8, eval_every=2, lr=1e-2)  # snapshots at steps 0, 2, ..., 8
    torch.manual_seed(0)
    full = train_classifier(mlp(4, [8], 2), x, y, config)
    real, saves = torch.save, []

    def fails_at_step_6(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        saves.append(obj["step"])
        return (_half_then_fail(real) if obj["step"] == 6 else real)(obj, f, *args, **kwargs)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(torch, "save", fails_at_step_6)
    torch.manual_seed(0)
    with pytest.raises(OSError, match="No space"):
        train_classifier(mlp(4, [8], 2), x, y, config, checkpoint_dir=ckpt)
    monkeypatch.undo()
    assert saves == [2, 4, 6]
    assert _litter(ckpt) == ["config.json", "state.pt", *(f"step{s}.safetensors" for s in (0, 2, 4, 6))]
    (ckpt / "step8.safetensors.tmp-killed.tmp").write_bytes(b"half a snaps")  # what SIGKILL would leave
    torch.manual_seed(123)  # another init: the resumed run must load the step-4 weights
    resumed = train_classifier(mlp(4, [8], 2), x, y, config, checkpoint_dir=ckpt)
    assert resumed.steps == full.steps
    for a, b in zip(full.losses, resumed.losses, strict=True):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b))


def test_a_figure_failing_mid_write_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from memprobe.plots import save_figure

    def figure(value: float) -> matplotlib.figure.Figure:
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, value])
        return fig

    png, pdf = save_figure(figure(1), tmp_path / "roc.png"), save_figure(figure(1), tmp_path / "roc.pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"  # format from the name
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _half_then_fail(matplotlib.figure.Figure.savefig))
    for path in (png, pdf):
        with pytest.raises(OSError, match="No space"):
            save_figure(figure(2), path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert plt.get_fignums() == []  # closed even when saving failed


def test_a_model_directory_failing_mid_save_is_not_a_finished_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save_pretrained dies after config.json and half the weights: no directory appears, so the next
    call trains again instead of loading a broken checkpoint (config.json marks a finished run)."""
    from transformers import PreTrainedModel

    from memprobe.models import load_model
    from memprobe.train.tiny_lm import train_tiny_lm

    real = PreTrainedModel.save_pretrained

    def dies_half_way(self, directory, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real(self, directory, *args, **kwargs)
        weights = Path(directory) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        raise OSError(28, "No space left on device")

    texts, ckpt = ["the same line again and again"] * 4, tmp_path / "tiny"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        train_tiny_lm(texts, n_layers=1, d_model=16, steps=2, seq_len=8, batch=2, checkpoint=ckpt)
    assert _litter(tmp_path) == []
    monkeypatch.undo()
    trained = train_tiny_lm(texts, n_layers=1, d_model=16, steps=2, seq_len=8, batch=2, checkpoint=ckpt)
    assert _litter(tmp_path) == ["tiny"] and (ckpt / "tokenizer.json").is_file()
    reloaded = load_model(str(ckpt))
    for name, value in trained.model.state_dict().items():
        assert (reloaded.model.state_dict()[name] == value).all(), name


def test_atomic_path_gives_each_writer_its_own_temp_and_an_ordinary_file(tmp_path: Path) -> None:
    from memprobe.io import atomic_path

    target = tmp_path / "kernel.so"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.name.endswith(".tmp") and second.name.startswith("kernel.so.tmp-")
        first.write_bytes(b"one")
        second.write_bytes(b"two")
    assert target.read_bytes() == b"one" and (target.stat().st_mode & 0o777) == 0o644  # the last rename won
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("compiler failed")
    assert target.read_bytes() == b"one" and _litter(tmp_path) == ["kernel.so"]
    (tmp_path / "kernel.so.tmp-killed.tmp").write_bytes(b"half")
    remove_staged(target)
    assert _litter(tmp_path) == ["kernel.so"]
