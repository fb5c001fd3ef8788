"""Atomic writes: every file and directory memprobe produces appears whole or not at all.

Why one module: a resumable job trusts whatever it finds on disk, so "the name exists" must mean
"the content is complete". Four writers with their own temp-file habits drifted (some fsynced, some
did not, one left temp files behind on errors); this is the single policy: write to `<name>.tmp`
beside the target, fsync, `os.replace`, fsync the parent directory; on any failure the temp file is
removed and the old target (if any) is left as it was.

Three entry points share it: `atomic_write` (bytes or text we produce), `atomic_path` (a temp name
for a library that insists on writing a file itself: savefig, safetensors, torch.save, a compiler)
and `staged_directory` (a temp directory for a directory of files: save_pretrained, checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

_CHUNK = 1 << 22  # bytes per os.write call: large buffers are written in slices of this size
_SMALL = 1 << 16  # parts smaller than this are gathered into one buffer before writing

Data = bytes | bytearray | memoryview | str


def atomic_write(
    path: str | Path,
    data: Data | Iterable[Data],
    *,
    fsync: bool = True,
    drop_cache: bool = False,
) -> Path:
    """Write `data` (bytes or text, or an iterable of such chunks written back to back) to `path`.

    Readers see the old file or all of the new one, never a part. Text is encoded as UTF-8. Large
    buffers (memoryviews of tensors) are written without copying; small chunks (JSONL lines) are
    gathered so a file of many records costs few system calls.

    `drop_cache` tells the kernel to drop the file's pages once they are on disk: a capture never
    reads its shards back, and gigabytes of them left in the page cache make the kernel reclaim memory
    in the middle of later forward passes (float32 capture measured 5-15% faster with it).
    `fsync=False` gives up durability across a power cut (not atomicity) for scratch files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview, str)) else data
    with _renamed_into_place(tmp, path, fsync=fsync):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pending = bytearray()
            for chunk in chunks:
                part = memoryview(chunk.encode() if isinstance(chunk, str) else chunk).cast("B")
                if part.nbytes < _SMALL:
                    pending += part
                    if len(pending) < _CHUNK:
                        continue
                _write_all(fd, pending)
                pending = bytearray()
                if part.nbytes >= _SMALL:
                    _write_all(fd, part)
            _write_all(fd, pending)
            if fsync:
                os.fsync(fd)
            if drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return path


@contextlib.contextmanager
def _renamed_into_place(tmp: Path, path: Path, *, fsync: bool) -> Iterator[None]:
    """The block fills `tmp`; then it becomes `path` in one rename (made durable with `fsync`). On
    any failure, `tmp` is removed and `path` is left as it was."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """A fresh temp file name beside `path` for a library that writes by file name (savefig,
    safetensors `save_file`, `torch.save`, a compiler's `-o`); renamed to `path` when the block succeeds.

    The same policy as `atomic_write`: on any failure the temp file is removed and the old `path` is
    left as it was. The temp name, `<name>.tmp-XXXXXXXX.tmp`, is unique (processes writing the same
    target at once never share a half-written file) and ends in `.tmp`, so no glob for finished files
    (`step*.safetensors`) ever picks one up; a library that infers a format from the name must be told
    it (savefig's `format=`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".tmp-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    with _renamed_into_place(tmp, path, fsync=fsync):
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if tmp.stat().st_mode & 0o777 == 0o600:  # still mkstemp's private mode: make it ordinary
            tmp.chmod(0o644)


def _write_all(fd: int, data: bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:_CHUNK]) :]


def fsync_directory(path: str | Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # the rename itself is already done
    finally:
        os.close(fd)


def publish_directory(tmp: str | Path, target: str | Path, *, replace: bool = False) -> Path:
    """Move the finished directory `tmp` to `target` in one rename, after its files are on disk.

    `tmp` must be on the same filesystem (make it with `staged_directory`). An existing non-empty
    `target` is replaced only when `replace` is true: it is first renamed aside, so at every moment
    `target` is either the old directory or the new one, and the old one is deleted last.
    """
    tmp, target = Path(tmp), Path(target)
    for root, _dirs, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(root)
    old = None
    if target.exists() and (target.is_file() or any(target.iterdir())):
        if not replace:
            raise FileExistsError(f"{target} exists and is not empty")
        old = Path(tempfile.mkdtemp(prefix=target.name + ".old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)  # rename(2) replaces an empty directory
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_directory(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """A fresh temp directory beside `target`; published to `target` when the block succeeds.

    On an exception the temp directory is deleted and `target` is untouched. A kill leaves only a
    `<target>.tmp-*` directory, which `remove_staged` (or the caller's clean-up) deletes.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a published directory is an ordinary one
    try:
        yield tmp
        publish_directory(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_staged(target: str | Path) -> None:
    """Delete leftovers of a killed `staged_directory(target)` or `atomic_write(target)`."""
    target = Path(target)
    for stray in target.parent.glob(target.name + ".tmp*"):
        if stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)
