"""Generate volumes with a trained latent diffusion model and write them as NIfTI files and a PNG mosaic."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config, ConfigError, config_from_dict
from monai_diffusion.data import save_nifti
from monai_diffusion.training.run import RunError
from monai_diffusion.training.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
from monai_diffusion.training.diffusion import generate_volumes
from monai_diffusion.training.runtime import resolve_device
from monai_diffusion.training.visualize import save_png, volume_grid

__all__ = ["load_diffusion", "sample_volumes"]

log = logging.getLogger("monai_diffusion")


def load_diffusion(run_or_checkpoint: str | Path, device: torch.device | str = "cpu"):
    """Load ``(unet, autoencoder, config, scale_factor, reference_affine)`` from a diffusion run or checkpoint.

    The EMA weights are used when the run kept them.
    """
    path = Path(run_or_checkpoint)
    if path.is_dir():
        candidates = [checkpoint_path(path, name) for name in ("best", "last")]
        path = next((c for c in candidates if c.is_file()), candidates[-1])
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        raise RunError(f"--run: {err}; train the diffusion model first (train_diffusion.py)") from None
    if state.get("stage") != "diffusion":
        raise RunError(f"--run: {path} is not a diffusion checkpoint")
    try:
        config: Config = config_from_dict(state["config"])
    except ConfigError as err:
        raise RunError(f"{path}: stored config is invalid ({err})") from None
    unet = DiffusionModelUNet(**state["unet_args"])
    if state.get("ema") is not None:
        ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        unet.load_state_dict(ema, strict=True)
    else:
        unet.load_state_dict(state["unet"], strict=True)
    autoencoder = AutoencoderKL(**state["autoencoder_args"])
    autoencoder.load_state_dict(state["autoencoder"], strict=True)
    return (unet.to(device).eval(), autoencoder.to(device).eval(), config, float(state["scale_factor"]),
            state["reference_affine"])


def sample_volumes(
    run: str | Path,
    num_samples: int,
    output: str | Path,
    scheduler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "auto",
) -> list[Path]:
    """Generate ``num_samples`` volumes; write ``sample_XXX.nii.gz`` and ``samples.png`` into ``output``.

    Returns:
        the NIfTI paths. Nothing already in ``output`` is overwritten: existing sample files are an error.
    """
    if num_samples < 1 or batch_size < 1 or steps < 1:
        raise RunError("--num-samples, --batch-size and --steps must be integers >= 1")
    torch_device = resolve_device(device)
    unet, autoencoder, config, scale_factor, affine = load_diffusion(run, torch_device)
    output = Path(output)
    names = [output / f"sample_{index:03d}.nii.gz" for index in range(num_samples)]
    existing = [p for p in names + [output / "samples.png"] if p.exists()]
    if existing:
        raise RunError(f"--output: {existing[0]} already exists; choose an empty folder (nothing was overwritten)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"--output: cannot create {output} ({err.strerror})") from None
    generator = torch.Generator().manual_seed(seed)
    volumes = []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        log.info("sampling volumes %d-%d of %d (%s, %d steps)", start + 1, start + count, num_samples, scheduler, steps)
        batch = generate_volumes(unet, autoencoder, config, scale_factor, count, steps, scheduler, generator,
                                 verbose=True).cpu()
        volumes.extend(batch)
    for volume, name in zip(volumes, names):
        save_nifti(volume.clamp(0, 1), name, affine=affine)
    save_png(volume_grid([("samples", [v.clamp(0, 1) for v in volumes])], spatial_dims=config.autoencoder.spatial_dims),
             output / "samples.png")
    log.info("wrote %d NIfTI volumes and samples.png to %s", len(names), output)
    return names
