"""memprobe: find where and how neural networks memorize, predict what they will memorize, suppress it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memprobe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from memprobe.errors import MemprobeError  # noqa: E402


def open_store(path):  # noqa: ANN001, ANN201 - re-exported below with full hints
    """Open an activation store written by `memprobe capture` (lazy, checksummed reads)."""
    from memprobe.store import ActivationStore

    return ActivationStore.open(path)


__all__ = ["MemprobeError", "__version__", "open_store"]
