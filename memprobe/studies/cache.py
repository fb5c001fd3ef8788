"""One content-keyed step cache for the audit, the studies and the experiments.

Why one: the audit kept `steps/<name>.done.json` records, experiments kept npz files named by a hash
of some of their inputs, or by a site name only; each rule for "is this still valid" drifted. Here a
step's key is the hash of (1) its inputs' content (file and directory digests, or JSON values such as
document ids and texts), (2) its settings (a typed config's JSON) and (3) the code (memprobe's version
and the source of the functions/modules named). A step is done only when `<root>/steps/<name>.done.json`
(written last, atomically) names that key and every output it lists still has the recorded digest:
an output that a kill left half written, or that changed since, makes the step run again. Outputs a
killed attempt with the same key may continue (an activation store resuming shard by shard) are kept.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from memprobe.errors import MemprobeError
from memprobe.io.atomic import remove_staged
from memprobe.results import _plain, write_json


def output_digest(path: str | Path) -> str | None:
    """A digest of a file or directory as it is now (None: absent), after checking it is whole.

    An activation store counts only when complete and every shard verifies (else MemprobeError), and
    is then known by its manifest, which holds every shard's checksums; another directory is known by
    its files' digests.
    """
    from memprobe.store import MANIFEST, ActivationStore
    from memprobe.store.integrity import file_digest

    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return file_digest(path, "xxh3_128")
    if (path / MANIFEST).is_file():
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # an incomplete store is reported below, not warned about
            store = ActivationStore.open(path)
        if not store.complete:
            raise MemprobeError(f"{path} is an incomplete activation store; re-run to finish it")
        store.verify()
        return "store:" + file_digest(path / MANIFEST, "xxh3_128")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [[str(p.relative_to(path)), file_digest(p, "xxh3_128")] for p in files]
    return "dir:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def value_digest(value: Any) -> str:
    """The digest of a JSON-able value (numpy arrays and tensors become lists): doc ids and texts, rows."""
    return hashlib.sha256(json.dumps(_plain(value), sort_keys=True).encode()).hexdigest()


def code_version(*code: Any) -> dict[str, str]:
    """memprobe's version and the source hash of each function, class or module the step runs."""
    from memprobe import __version__

    sources = []
    for obj in code:
        try:
            sources.append(inspect.getsource(obj))
        except (OSError, TypeError):
            sources.append(getattr(obj, "__qualname__", repr(obj)))
    return {
        "memprobe": __version__,
        "source": hashlib.sha256("\n".join(sources).encode()).hexdigest(),
    }


def settings_json(settings: Any) -> Any:
    """A typed config (dataclass) or a mapping as plain JSON for the key."""
    if is_dataclass(settings) and not isinstance(settings, type):
        settings = asdict(settings)
    return _plain(settings)


class StepCache:
    """Steps cached under `root`: outputs are paths relative to it, records live in `root/steps/`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(
        self,
        name: str,
        *,
        inputs: Mapping[str, Any] = {},
        settings: Any = None,  # noqa: B006
        code: Sequence[Any] = (),
    ) -> str:
        """The step's key. An input that is a Path is known by its content (output_digest), any other
        value by its JSON; a relative Path is taken inside `root`."""
        found = {}
        for label, value in inputs.items():
            found[label] = (
                output_digest(self.root / value) if isinstance(value, Path) else value_digest(value)
            )
        payload = {
            "step": name,
            "inputs": found,
            "settings": settings_json(settings),
            "code": code_version(*code),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _record(self, name: str, kind: str) -> Path:
        return self.root / "steps" / f"{'-'.join(name.split())}.{kind}.json"

    def is_done(self, name: str, key: str) -> bool:
        """Whether the step's record names `key` and every output it lists is there, whole and unchanged."""
        try:
            done = json.loads(self._record(name, "done").read_text())
        except (OSError, ValueError):
            return False
        if (
            not isinstance(done, dict)
            or done.get("key") != key
            or not isinstance(done.get("outputs"), dict)
        ):
            return False
        try:
            return all(output_digest(self.root / o) == d for o, d in done["outputs"].items())
        except (MemprobeError, OSError):  # damaged, incomplete, or vanished while being read
            return False

    def seconds(self, name: str) -> float | None:
        """How long the step's recorded run took (None: no record)."""
        try:
            return float(json.loads(self._record(name, "done").read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def run(
        self,
        name: str,
        outputs: Sequence[str],
        fn: Callable[[Path], Any],
        *,
        inputs: Mapping[str, Any] = {},
        settings: Any = None,
        code: Sequence[Any] = (),  # noqa: B006
        resumable: Sequence[str] = (),
        key: str | None = None,
    ) -> bool:
        """Run `fn(root / outputs[0])` unless the step is done; True when it reused a finished run.

        `fn` must write every name in `outputs` (a name it leaves absent is recorded as absent);
        `resumable`: outputs an interrupted attempt with the same key leaves for this one to continue.
        """
        key = key or self.key(name, inputs=inputs, settings=settings, code=code)
        if self.is_done(name, key):
            return True
        self._clear_stale(name, key, [*outputs, *resumable], resumable)
        t = time.perf_counter()
        fn(self.root / outputs[0])
        seconds = time.perf_counter() - t
        digests = {o: output_digest(self.root / o) for o in outputs}
        write_json(
            self._record(name, "done"),
            {"step": name, "key": key, "outputs": digests, "seconds": seconds},
        )
        return False

    def _clear_stale(
        self, name: str, key: str, outputs: Sequence[str], resumable: Sequence[str]
    ) -> None:
        """Before (re-)running a step: delete what an earlier, unverified attempt left.

        `<name>.started.json` records the key of the attempt in progress, so outputs in `resumable`
        survive only when that attempt had the same key.
        """
        started = self._record(name, "started")
        try:
            same_key = json.loads(started.read_text()).get("key") == key
        except (OSError, ValueError, AttributeError):
            same_key = False
        self._record(name, "done").unlink(missing_ok=True)
        for output in outputs:
            target = self.root / output
            remove_staged(target)
            if output in resumable and same_key:
                continue
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        write_json(started, {"step": name, "key": key})

    def json(self, name: str, compute: Callable[[], Any], **key_parts: Any) -> Any:
        """A JSON-able value computed once per key and read back after (`key_parts` as for `run`)."""
        output = f"{'-'.join(name.split())}.json"
        self.run(name, [output], lambda path: write_json(path, {"value": compute()}), **key_parts)
        return json.loads((self.root / output).read_text())["value"]
