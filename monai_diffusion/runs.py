"""Run folders and result folders: where each command writes, and the rules that keep results safe.

A training stage's run folder is ``<output_dir>/<stage>`` (``<output_dir>/fast_dev_run/<stage>`` for a
``fast_dev_run``, which is scratch and replaced each time). A folder holding a checkpoint is never
overwritten: continuing it needs ``--resume``. Result folders of evaluation and the factor study must be
new or empty.
"""

from __future__ import annotations

from pathlib import Path

from monai_diffusion.checkpoints import checkpoint_path
from monai_diffusion.errors import RunError

__all__ = ["run_folder", "check_run_dir", "create_run_dir", "check_new_folder", "run_dir_of"]


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


def create_run_dir(run_dir: Path, clear_scratch: bool) -> None:
    """Create the folder (checking it is writable); ``clear_scratch`` drops an old fast_dev_run's checkpoints."""
    if clear_scratch:
        for stale in (checkpoint_path(run_dir, "last"), checkpoint_path(run_dir, "best")):
            stale.unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"output_dir: cannot write to {run_dir} ({err.strerror}); choose a writable folder") from None


def check_new_folder(folder: Path, key: str = "--output") -> None:
    """Refuse a results folder that already holds files (or is a file): nothing is ever overwritten."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RunError(f"{key}: {folder} already exists and is not an empty folder; choose another "
                       f"folder (nothing was overwritten)")
