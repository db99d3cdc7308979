"""Writing files so that a crash never leaves a torn one, and the one-line error for a full or
read-only disk. Used by the run's outputs (growrun/train/outputs.py) and the loggers' id file
(growrun/loggers/)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from growrun import faults
from growrun.errors import GrowrunError

# errors of the disk rather than of growrun: turned into one line naming the file
_DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EIO: "I/O error"}


def disk_error(ex: OSError, path: Path) -> GrowrunError | None:
    """The one-line error for an OSError of the disk while writing `path`, else None."""
    what = _DISK_ERRORS.get(ex.errno)
    return None if what is None else GrowrunError(f"writing {path}: {what}; free space or fix the "
                                                  "directory, then `growrun resume` the run")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """Write through a temporary file in the same directory (flushed and fsynced), then rename
    over `path` and fsync the directory. With `keep_previous`, the current `path` is first
    renamed to it, so that one complete file exists at every moment. A disk error (full, read
    only, ...) becomes a GrowrunError; the temporary file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        faults.reach(f"write:{path.name}")
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
            faults.reach("rotate")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as ex:
        tmp.unlink(missing_ok=True)
        raise (disk_error(ex, path) or ex) from None
