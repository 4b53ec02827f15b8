"""Writing a file so that a kill at any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object], overwrite: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, flush and fsync it, then rename it over
    ``path``. The temporary file (``.<name>.<random>.tmp``) is removed if anything fails.

    ``overwrite=False``: the file is linked into place only if ``path`` does not exist (FileExistsError
    otherwise, also when another process created it meanwhile: no check-then-write race)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
