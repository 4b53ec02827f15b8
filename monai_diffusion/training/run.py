"""The run folder and resuming, shared by both training stages.

A stage's run folder is ``<output_dir>/<stage>`` (``<output_dir>/fast_dev_run/<stage>`` for a
``fast_dev_run``, which is scratch and replaced each time). A folder holding a checkpoint is never
overwritten: continuing it needs ``--resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai_diffusion.training.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from monai_diffusion.training.loop import LoopState
import logging

from monai_diffusion.training.runtime import Precision, Runtime, restore_rng, seed_everything

log = logging.getLogger("monai_diffusion")

__all__ = ["RunError", "differences", "run_folder", "check_run_dir", "create_run_dir", "load_for_resume",
           "restore_loop", "open_writer", "check_new_folder"]


class RunError(ValueError):
    """The run folder does not allow what was asked (existing run without --resume, nothing to resume, ...)."""


def differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every key whose value differs."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def run_folder(output_dir: str | Path, stage: str, fast_dev_run: bool) -> Path:
    """``<output_dir>/<stage>``, or ``<output_dir>/fast_dev_run/<stage>``."""
    return Path(output_dir) / "fast_dev_run" / stage if fast_dev_run else Path(output_dir) / stage


def check_run_dir(run_dir: Path, resume: bool, fast_dev_run: bool) -> None:
    """Refuse to overwrite a run or to resume nothing (no side effects; a fresh fast_dev_run may replace its scratch)."""
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


def load_for_resume(run_dir: Path, stage: str) -> dict[str, Any]:
    """The ``last`` checkpoint of ``run_dir``, which must belong to ``stage``, loaded onto the CPU.

    Each state is moved to its device by the module or optimiser that loads it (``load_state_dict``); RNG
    states stay CPU tensors, as ``torch.set_rng_state`` requires. Drop the returned dict once loaded, so no
    second copy of the weights stays alive during training.
    """
    path = checkpoint_path(run_dir, "last")
    try:
        saved = load_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        raise RunError(f"--resume: {err}") from None
    if saved.get("stage") != stage:
        raise RunError(f"--resume: {path} is not {'an' if stage[0] in 'aeiou' else 'a'} {stage} checkpoint")
    return saved


def restore_loop(saved: dict[str, Any], precision: Precision, runtime: Runtime, seed: int) -> LoopState:
    """Loop position, grad scaler and this rank's RNG states from a checkpoint (call after building the task).

    Every rank saved its own RNG streams; rank ``r`` restores stream ``r``. A run resumed with a different
    number of processes cannot have the same streams: each rank is then re-seeded from ``seed``, the step
    and its rank (training continues correctly, but not bit for bit as an uninterrupted run would).
    """
    precision.load_scaler_state(saved["scaler"])
    state = LoopState(**saved["loop"])
    streams = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # runs saved before 0.5: one
    if len(streams) == runtime.world_size:
        restore_rng(streams[runtime.rank], runtime.device)
    else:
        if runtime.is_main:
            log.warning("resuming %d process(es) from a checkpoint of %d: random streams are re-seeded per rank, so "
                        "the run continues correctly but not bit-exactly", runtime.world_size, len(streams))
        seed_everything(seed + 1_000_003 * state.global_step + runtime.rank)
    return state


def open_writer(run_dir: Path, runtime: Runtime) -> Any | None:
    """A TensorBoard writer in ``run_dir/tensorboard`` on rank 0 (None elsewhere)."""
    if not runtime.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def check_new_folder(folder: Path) -> None:
    """Refuse a results folder that already holds files (or is a file): nothing is ever overwritten."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RunError(f"--output: {folder} already exists and is not an empty folder; choose another "
                       f"folder (nothing was overwritten)")
