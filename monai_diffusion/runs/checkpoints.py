"""Checkpoints: atomic writes, safe reads, and loading trained models from a run folder or a ``.pt`` file.

A checkpoint is a dict with the networks' and optimisers' states, the loop's position, every rank's RNG
streams, the constructor arguments of the networks and the whole resolved config. It is written to a
temporary file, flushed, fsync'ed and renamed, so a kill at any moment leaves the previous checkpoint
intact. It holds plain data only (tensors, numbers, strings, lists, dicts), so it is read with
``torch.load(..., weights_only=True)``: a checkpoint from an untrusted source cannot run code. Checkpoints
of monai-diffusion 0.4.0 stored NumPy's RNG state as an array; exactly the NumPy types that needs are
allowed as well.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet

from generative.networks.nets import AutoencoderKL
from monai_diffusion.runs.atomic import atomic_write, fsync_dir
from monai_diffusion.generation.conditioning import Conditioning
from monai_diffusion.config import Config, config_from_dict
from monai_diffusion.errors import CheckpointError, ConfigError
from monai_diffusion.pretrained.unet import build_unet

__all__ = ["FORMAT", "build_unet", "save_checkpoint", "unconfirmed_path", "confirm_checkpoint", "load_checkpoint",
           "checkpoint_path", "resolve_checkpoint", "load_autoencoder", "load_diffusion", "DiffusionBundle",
           "weights_fingerprint"]

FORMAT = "monai_diffusion.checkpoint/1"

# what monai-diffusion 0.4.0 checkpoints need beyond weights_only's defaults: NumPy's RNG state (an array)
_LEGACY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every entry's name, dtype, shape and bytes, in name order. Two sets of weights
    share it only when they are identical (the identity of a trained network, e.g. the autoencoder a diffusion
    run and its latent cache were made with)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_path(run_dir: str | Path, name: str) -> Path:
    """``<run_dir>/checkpoints/<name>.pt`` (names: ``last``, ``best``, ``step_<n>``)."""
    return Path(run_dir) / "checkpoints" / f"{name}.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def unconfirmed_path(run_dir: str | Path, name: str) -> Path:
    """``<run_dir>/checkpoints/.<name>.unconfirmed.pt``: a checkpoint written but not yet confirmed (see
    :func:`confirm_checkpoint`); hidden, never named by ``last.pt``, removed when a later run starts."""
    return Path(run_dir) / "checkpoints" / f".{name}.unconfirmed.pt"


def confirm_checkpoint(path: str | Path, keep_last: int) -> Path:
    """Give an unconfirmed checkpoint its name and make ``last.pt`` name it.

    ``.last.unconfirmed.pt`` is renamed over ``last.pt``; ``.step_<n>.unconfirmed.pt`` becomes ``step_<n>.pt``,
    ``last.pt`` becomes the same file (the atomic rename of a hard link, so it is never half-written) and only
    the newest ``keep_last`` step checkpoints are kept (``best.pt`` is never rotated away).
    """
    path = Path(path)
    name = path.name.removeprefix(".").removesuffix(".unconfirmed.pt")
    final = path.with_name(f"{name}.pt")
    os.replace(path, final)
    if name != "last":
        last = final.with_name("last.pt")
        link = last.with_name(f".{last.name}.{os.getpid()}.link")
        link.unlink(missing_ok=True)
        os.link(final, link)
        os.replace(link, last)
        for old in sorted(final.parent.glob("step_*.pt"))[:-keep_last]:
            old.unlink()
    fsync_dir(final.parent)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (plain data only: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a monai_diffusion checkpoint, or it holds objects other than plain "
                              f"data ({first[:200]})") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
        reason = str(err).strip().split(". ")[0][:200]  # torch's zip reader adds sentences of advice
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {reason}); the file "
                              f"is truncated or corrupt") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a monai_diffusion checkpoint (no '{FORMAT}' marker)")
    return state


def resolve_checkpoint(run_or_checkpoint: str | Path, key: str = "--run") -> Path:
    """The checkpoint file of a run folder (``best``, else ``last``) or the file itself.

    Raises:
        CheckpointError: naming ``key`` when there is no such folder or file, or no checkpoint in the folder.
    """
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in ("best", "last"):
            candidate = checkpoint_path(path, name)
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{key}: no checkpoints/best.pt or checkpoints/last.pt in the run folder {path}")
    if not path.exists():
        raise CheckpointError(f"{key}: {path}: no such run folder or checkpoint file")
    return path


def _stored_config(state: dict[str, Any], path: Path) -> Config:
    """The config a checkpoint was trained with: types only, its rules were checked when it was trained."""
    try:
        return config_from_dict(state["config"], stage=None)
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is not readable ({err})") from None


def load_autoencoder(
    run_or_checkpoint: str | Path, map_location: str | torch.device = "cpu", key: str = "--run"
) -> tuple[AutoencoderKL, Config]:
    """Load a trained AutoencoderKL in eval mode, with the config it was trained with.

    Args:
        run_or_checkpoint: an autoencoder run folder (``best`` is preferred over ``last``) or a ``.pt`` file.
        map_location: device for the weights.
        key: the option or config key named in errors.

    Returns:
        ``(model, config)``.
    """
    path = resolve_checkpoint(run_or_checkpoint, key)
    state = load_checkpoint(path)
    if "autoencoder" not in state or "model_args" not in state:
        raise CheckpointError(f"{key}: {path} holds no autoencoder (is it a diffusion checkpoint?)")
    config = _stored_config(state, path)
    model = AutoencoderKL(**{**state["model_args"], "use_checkpointing": False})
    model.load_state_dict(state["autoencoder"], strict=True)
    return model.to(map_location).eval(), config


class DiffusionBundle(NamedTuple):
    """What a diffusion checkpoint holds for sampling."""

    unet: DiffusionModelUNet  # EMA weights when the run kept them
    autoencoder: AutoencoderKL  # the frozen autoencoder the UNet was trained on
    config: Config
    scale_factor: float  # latents were multiplied by it in training
    reference_affine: torch.Tensor  # 4x4 affine of the training volumes
    conditioning: Conditioning  # a conditional model's classes and covariate statistics (inactive: unconditional)


def load_diffusion(
    run_or_checkpoint: str | Path, map_location: str | torch.device = "cpu", key: str = "--run"
) -> DiffusionBundle:
    """Load a trained latent diffusion model from a diffusion run folder or checkpoint (EMA weights when the
    run kept them), in eval mode."""
    path = resolve_checkpoint(run_or_checkpoint, key)
    state = load_checkpoint(path)
    if state.get("stage") != "diffusion":
        raise CheckpointError(f"{key}: {path} is not a diffusion checkpoint")
    config = _stored_config(state, path)
    unet = build_unet(state["unet_args"])  # core's DiffusionModelUNet, or an imported variant of it
    if state.get("ema") is not None:
        ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        unet.load_state_dict(ema, strict=True)
    else:
        unet.load_state_dict(state["unet"], strict=True)
    autoencoder = AutoencoderKL(**state["autoencoder_args"])
    autoencoder.load_state_dict(state["autoencoder"], strict=True)
    return DiffusionBundle(unet.to(map_location).eval(), autoencoder.to(map_location).eval(), config,
                           float(state["scale_factor"]), torch.as_tensor(state["reference_affine"]),
                           Conditioning.from_state(state.get("conditioning")))
