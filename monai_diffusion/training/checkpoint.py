"""Checkpoints: atomic writes, the run folder layout, and loading a trained autoencoder in a notebook.

A checkpoint is a dict with the networks' and optimisers' states, the loop's position, RNG states,
the AutoencoderKL constructor arguments (``model_args``) and the whole resolved config (``config``).
It is written to a temporary file, flushed, fsync'ed and renamed, so a kill at any moment leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config, ConfigError, config_from_dict

__all__ = ["CheckpointError", "save_checkpoint", "save_step_checkpoint", "load_checkpoint", "checkpoint_path", "load_autoencoder"]

FORMAT = "monai_diffusion.checkpoint/1"


class CheckpointError(ValueError):
    """A missing, unreadable or mismatched checkpoint."""


def checkpoint_path(run_dir: str | Path, name: str) -> Path:
    """``<run_dir>/checkpoints/<name>.pt`` (names: ``last``, ``best``)."""
    return Path(run_dir) / "checkpoints" / f"{name}.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_step_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write ``checkpoints/step_<step>.pt``, make ``last.pt`` the same file, keep only the newest ``keep_last``.

    ``last.pt`` is switched with an atomic rename of a hard link, so it is never half-written; ``best.pt``
    is never rotated away.
    """
    path = save_checkpoint(state, checkpoint_path(run_dir, f"step_{step:08d}"))
    last = checkpoint_path(run_dir, "last")
    link = last.with_name(f".{last.name}.{os.getpid()}.link")
    link.unlink(missing_ok=True)
    os.link(path, link)
    os.replace(link, last)
    for old in sorted(path.parent.glob("step_*.pt"))[:-keep_last]:
        old.unlink()
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a monai_diffusion checkpoint (no '{FORMAT}' marker)")
    return state


def _resolve(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in ("best", "last"):
            candidate = checkpoint_path(path, name)
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt in this run folder")
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    return path


def load_autoencoder(
    run_or_checkpoint: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[AutoencoderKL, Config]:
    """Load a trained AutoencoderKL in eval mode, with the config it was trained with.

    Args:
        run_or_checkpoint: an autoencoder run folder (``best`` is preferred over ``last``) or a ``.pt`` file.
        map_location: device for the weights.

    Returns:
        ``(model, config)``.
    """
    path = _resolve(run_or_checkpoint)
    state = load_checkpoint(path, map_location)
    if "autoencoder" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: holds no autoencoder (is it a diffusion checkpoint?)")
    try:
        config = config_from_dict(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is invalid ({err})") from None
    model = AutoencoderKL(**{**state["model_args"], "use_checkpointing": False})
    model.load_state_dict(state["autoencoder"], strict=True)
    return model.to(map_location).eval(), config
