"""The shape every study result shares (as Captum's methods share one call shape): to_dict, save, plot.

Why a base class: the audit, the experiments and the report read results; when every result turns
into the same plain JSON through `to_dict` and is written by the same atomic `save`, a caller never
needs to know which study made it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class StudyResult(Protocol):
    """What callers of a study rely on."""

    def to_dict(self) -> dict[str, Any]: ...

    def save(self, path: str | Path) -> Path: ...

    def plot(self, path: str | Path | None = None) -> Any: ...


class Result:
    """Base for results: `save` writes `to_dict()` as JSON atomically; `plot` returns a figure (saved
    to `path` when one is given, with memprobe's figure provenance)."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        from memprobe.results import write_json

        return write_json(path, self.to_dict())

    def figure(self, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no figure")

    def plot(
        self, path: str | Path | None = None, *, script: str | None = None, **kwargs: Any
    ) -> Any:
        fig = self.figure(**kwargs)
        if path is not None:
            from memprobe.plots import save_figure

            save_figure(fig, path, script=script)
        return fig
