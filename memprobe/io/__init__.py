"""Files that are either whole or absent: memprobe's one atomic file writer and directory publisher."""

from memprobe.io.atomic import (
    atomic_path,
    atomic_write,
    fsync_directory,
    publish_directory,
    remove_staged,
    staged_directory,
)

__all__ = ["atomic_path", "atomic_write", "fsync_directory", "publish_directory", "remove_staged", "staged_directory"]
