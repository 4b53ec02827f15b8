"""Fine-tuning starts: ``autoencoder.init_from`` and ``diffusion.init_from``.

A new run takes the weights of a run folder or checkpoint (one we trained or one ``ldm-import`` wrote) and
nothing else: the optimiser, the learning-rate schedule (warm-up included), the step counter and the
discriminator start fresh. The architecture must be the same; a difference ends in one line naming it. On
``--resume`` the run's own checkpoint wins and ``init_from`` is not read again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_diffusion.errors import CheckpointError, RunError
from monai_diffusion.generation.conditioning import Conditioning
from monai_diffusion.pretrained.unet import unet_differences
from monai_diffusion.runs.checkpoints import load_checkpoint, resolve_checkpoint

__all__ = ["autoencoder_start", "unet_start", "differences_of"]

log = logging.getLogger("monai_diffusion")
_IGNORED = ("use_checkpointing",)  # memory settings, not architecture


def differences_of(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every constructor argument both give that differs (lists and tuples alike)."""

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    keys = [k for k in old if k in new and k not in _IGNORED]  # arguments one side leaves at its default: equal
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if plain(old.get(k)) != plain(new.get(k))]


def _read(source: str | Path, key: str) -> tuple[Path, dict[str, Any]]:
    try:
        path = resolve_checkpoint(source, key)
        return path, load_checkpoint(path)
    except CheckpointError as err:
        raise RunError(f"{err}; point {key} at a run folder or checkpoint (ours, or one written by ldm-import)") \
            from None


def _check(changed: list[str], path: Path, key: str, section: str) -> None:
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise RunError(f"{key}: {path} holds another architecture than the config's {section} section "
                       f"({shown}); use the config written with it ({path.parent.parent}/config.yaml) or another "
                       f"{key}")


def autoencoder_start(model: nn.Module, source: str | Path, key: str = "autoencoder.init_from") -> Path:
    """Load the autoencoder weights of ``source`` into ``model`` (an autoencoder or a diffusion checkpoint,
    whose frozen autoencoder is taken). Returns the checkpoint's path."""
    path, state = _read(source, key)
    if "autoencoder" not in state:
        raise RunError(f"{key}: {path} holds no autoencoder")
    saved_args = state.get("model_args") or state.get("autoencoder_args") or {}
    _check(differences_of(dict(saved_args), dict(model.init_args)), path, key, "autoencoder")
    model.load_state_dict(state["autoencoder"], strict=True)
    log.info("autoencoder weights from %s (fresh optimiser, schedule and discriminator)", path)
    return path


def _as_given(conditioning: Conditioning) -> bool:
    """The continuous covariates reach the UNet as they are (``standardize: false``: mean 0, std 1)."""
    return all(tuple(stats) == (0.0, 1.0) for stats in conditioning.continuous.values())


def _covariates(conditioning: Conditioning) -> str:
    parts = [f"categorical {list(conditioning.categorical)}"] if conditioning.categorical else []
    if conditioning.continuous:
        scale = "as given" if _as_given(conditioning) else "standardised"
        flag = "with" if conditioning.flag else "without"
        parts.append(f"continuous {list(conditioning.continuous)} {scale}, {flag} a presence flag")
    return ", ".join(parts) or "none"


def _check_covariates(stored: Conditioning, fitted: Conditioning, path: Path, key: str) -> None:
    """The UNet reads its conditions by position and scale: the new run must give it the same covariates, in
    order, standardised or as given as the source's were, with or without the flag as the source's."""
    same = (list(stored.categorical) == list(fitted.categorical) and list(stored.continuous) == list(fitted.continuous)
            and (not stored.continuous or (stored.flag == fitted.flag and _as_given(stored) == _as_given(fitted))))
    if not same:
        raise RunError(f"{key}: {path} was trained on the covariates ({_covariates(stored)}), the config's "
                       f"diffusion.conditioning gives ({_covariates(fitted)}); the UNet reads them by position, so "
                       f"list the same covariates in the same order, with the source's standardize and presence_flag "
                       f"({path.parent.parent}/config.yaml)")


def unet_start(unet: nn.Module, unet_args: dict[str, Any], source: str | Path, ema: Any = None,
               key: str = "diffusion.init_from", conditioning: Conditioning | None = None) -> tuple[Path, float]:
    """Load the UNet weights of the diffusion checkpoint ``source`` (its EMA weights when it kept them) into
    ``unet`` and the EMA copy ``ema``; ``conditioning`` (the new run's, when given) must name the covariates the
    source was trained on. Returns the checkpoint's path and its latent scale factor."""
    path, state = _read(source, key)
    if state.get("stage") != "diffusion":
        raise RunError(f"{key}: {path} is not a diffusion checkpoint (an autoencoder's goes to "
                       f"autoencoder.init_from or diffusion.autoencoder_run)")
    if conditioning is not None:
        _check_covariates(Conditioning.from_state(state.get("conditioning")), conditioning, path, key)
    _check(unet_differences(state["unet_args"], unet_args), path, "diffusion.init_from", "diffusion")
    weights = state["unet"]
    if state.get("ema") is not None:
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    unet.load_state_dict(weights, strict=True)
    if ema is not None:
        with torch.no_grad():
            for average, own in zip(ema.module.parameters(), unet.parameters()):
                average.copy_(own)
    log.info("UNet weights from %s (fresh optimiser and schedule; its latent scale factor %.4f)", path,
             float(state["scale_factor"]))
    return path, float(state["scale_factor"])
