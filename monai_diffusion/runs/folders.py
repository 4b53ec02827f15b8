"""Run folders and result folders: where each command writes, and the rules that keep results safe.

A training stage's run folder is ``<output_dir>/<stage>`` (``<output_dir>/fast_dev_run/<stage>`` for a
``fast_dev_run``, which is scratch and replaced each time). A folder holding a checkpoint is never
overwritten: continuing it needs ``--resume``. One training at a time uses a run folder (:class:`RunLock`).
Result folders of evaluation, sampling and the factor study must be new or empty. No output folder may lie
where the data is read from (:func:`check_outside_data`), or its NIfTI files would become training data.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

from monai_diffusion.runs.checkpoints import checkpoint_path
from monai_diffusion.data.files import data_pattern_covers
from monai_diffusion.errors import RunError

__all__ = ["run_folder", "check_run_dir", "create_run_dir", "clear_scratch", "check_new_folder", "make_output_folder",
           "run_dir_of", "RunLock", "lock_holder", "remove_orphans", "existing_ancestor", "check_writable",
           "check_outside_data", "claim_output_folder", "release_output_folders"]

log = logging.getLogger("monai_diffusion")

LOCK_NAME = ".lock"
# what an interrupted save leaves behind: atomic_write's temporary files, save_step_checkpoint's link, and a
# checkpoint written but not yet confirmed (see training/loop.py)
ORPHAN_PATTERNS = (".*.tmp", ".*.link", ".*.unconfirmed.pt")


def run_folder(output_dir: str | Path, stage: str, fast_dev_run: bool) -> Path:
    """``<output_dir>/<stage>``, or ``<output_dir>/fast_dev_run/<stage>``."""
    return Path(output_dir) / "fast_dev_run" / stage if fast_dev_run else Path(output_dir) / stage


def run_dir_of(run_or_checkpoint: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint inside one (``<run>/checkpoints/x.pt``)."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def check_run_dir(run_dir: Path, resume: bool, fast_dev_run: bool) -> None:
    """Refuse to overwrite a run or to resume nothing (no side effects; a fresh fast_dev_run may replace its
    scratch)."""
    if fast_dev_run and not resume:
        return
    last = checkpoint_path(run_dir, "last")
    if resume and not last.is_file():
        raise RunError(f"--resume: no checkpoint at {last}; start without --resume (or check output_dir)")
    if not resume and last.is_file():
        raise RunError(
            f"output_dir: {run_dir} already holds a trained run ({last}); pass --resume to continue it or set "
            f"output_dir to a new folder (nothing was changed)"
        )


def create_run_dir(run_dir: Path) -> None:
    """Create the folder, checking that it is writable."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"output_dir: cannot write to {run_dir} ({err.strerror}); choose a writable folder") from None
    check_writable(run_dir, "output_dir")


def clear_scratch(run_dir: Path) -> None:
    """Drop an old fast_dev_run's checkpoints (call with the run's lock held)."""
    for stale in (checkpoint_path(run_dir, "last"), checkpoint_path(run_dir, "best")):
        stale.unlink(missing_ok=True)


def existing_ancestor(path: Path) -> Path:
    """``path`` itself when it exists, else the nearest folder above it that does."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_writable(folder: Path, key: str) -> None:
    """Refuse ``folder`` (or, when it does not exist yet, the nearest existing folder above it) unless a file
    can be created in it. A real probe file, created and removed: ``os.access`` says yes to root even on a
    read-only or immutable folder."""
    existing = existing_ancestor(folder)
    if not existing.is_dir():
        raise RunError(f"{key}: cannot create {folder}: {existing} is a file, not a folder; choose another folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == Path(folder) else f": cannot create it in {existing}"
        raise RunError(f"{key}: cannot write to {folder}{where} ({err.strerror}); choose a writable folder") from None


def check_outside_data(folder: Path, paths: str | list[str] | None, key: str, data_key: str = "data.paths") -> None:
    """Refuse an output ``folder`` where files written later would be found as input data by ``paths`` (a
    data folder, or a glob that reaches into it): evaluation and sample NIfTI files would silently become
    training data of the next run."""
    if paths and data_pattern_covers(paths, folder):
        raise RunError(f"{key}: {folder} lies inside the data of {data_key} ({paths}), so the NIfTI files written "
                       f"there would be read as data by the next run; choose a folder outside it")


def lock_holder(path: Path) -> int | None:
    """The PID holding a ``flock`` on ``path``, from the kernel's table (Linux); None when unknown."""
    try:
        info = os.stat(path)
        table = Path("/proc/locks").read_text(encoding="ascii")
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if "FLOCK" in fields and device in fields:
            pid = fields[fields.index(device) - 1]
            return int(pid) if pid.isdigit() else None
    return None


class RunLock:
    """One training per run folder: an exclusive ``fcntl.flock`` on ``<run>/.lock``, held for the whole run.

    The kernel drops the lock when the process ends, however it ends (``kill -9`` included), so a lock file
    left behind never blocks a later run. The file is never written: a refused second process changes
    nothing, and names the holder's PID (read from the kernel's lock table where there is one).
    """

    key, user = "output_dir", "training"  # named in the refusal

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (no-op when this object holds it); RunError when another process holds it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunError(f"{self.key}: cannot create the lock file {self.path} ({err.strerror}); choose a "
                           f"writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = lock_holder(self.path)
            holder = f"PID {pid}" if pid is not None else "another process"
            raise RunError(f"{self.key}: {self.path.parent} is in use by another {self.user} ({holder}); wait for it "
                           f"to finish or choose another folder for {self.key} (nothing was changed)") from None
        except OSError as err:  # a file system without locks
            os.close(fd)
            raise RunError(f"{self.key}: cannot lock {self.path} ({err.strerror}); put {self.key} on a local file "
                           f"system") from None
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_orphans(run_dir: Path, why: str = "left by an interrupted save") -> list[Path]:
    """Delete what interrupted saves left in ``run_dir`` and its ``checkpoints/`` (temporary files, links,
    unconfirmed checkpoints); call with the run's lock held, so no live save is touched. Returns them."""
    found = [path for folder in (run_dir, run_dir / "checkpoints") for pattern in ORPHAN_PATTERNS
             for path in sorted(folder.glob(pattern)) if path.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    if found:
        log.info("removed %d file(s) %s: %s", len(found), why, ", ".join(p.name for p in found))
    return found


def _check_not_in_use(folder: Path, key: str) -> None:
    lock = Path(folder) / LOCK_NAME
    pid = lock_holder(lock) if lock.is_file() else None
    if pid is not None:
        raise RunError(f"{key}: {folder} is in use by another command (PID {pid}); wait for it to finish or choose "
                       f"another folder (nothing was overwritten)")


def _holds_results(folder: Path) -> bool:
    """A file that is not a results folder, or a folder holding anything but an unheld lock file."""
    return not folder.is_dir() or any(path.name != LOCK_NAME for path in folder.iterdir())


def check_new_folder(folder: Path, key: str = "--output") -> None:
    """Refuse a results folder that already holds files (or is a file), that another command is writing, or
    where no folder can be created: nothing is ever overwritten, and nothing is computed for results that
    cannot be written. (Checked again, under the folder's lock, by :func:`claim_output_folder`.)"""
    folder = Path(folder)
    if folder.is_dir():
        _check_not_in_use(folder, key)
    if folder.exists() and _holds_results(folder):
        raise RunError(f"{key}: {folder} already exists and is not an empty folder; choose another "
                       f"folder (nothing was overwritten)")
    check_writable(folder, key)


def make_output_folder(folder: Path, key: str = "--output") -> None:
    """Create a checked results folder (RunError instead of an OSError traceback)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"{key}: cannot create {folder} ({err.strerror}); choose a writable folder") from None


class OutputLock(RunLock):
    """The lock of a results folder (sampling, evaluation, the factor study): the run lock's ``flock`` on
    ``<folder>/.lock``."""

    user = "command"

    def __init__(self, folder: Path, key: str = "--output") -> None:
        super().__init__(folder)
        self.key = key


_HELD: list[OutputLock] = []  # the results folders this process writes (released by release_output_folders)


def claim_output_folder(folder: Path, key: str = "--output") -> OutputLock:
    """Create the results ``folder`` and hold its lock until :func:`release_output_folders` (or the end of the
    process, however it ends), then check again, under the lock, that it holds no results: two commands
    started at once into one new folder never overwrite each other, the second is refused in one line.

    Returns:
        the held lock (also released by :func:`release_output_folders`, which the command lines call).
    """
    folder = Path(folder)
    make_output_folder(folder, key)
    lock = OutputLock(folder, key)
    lock.acquire()
    if _holds_results(folder):  # another command finished there between the first check and the lock
        lock.release()
        raise RunError(f"{key}: {folder} already exists and is not an empty folder; choose another folder "
                       f"(nothing was overwritten)")
    _HELD.append(lock)
    return lock


def release_output_folders() -> None:
    """Release every results folder :func:`claim_output_folder` took in this process."""
    while _HELD:
        _HELD.pop().release()
