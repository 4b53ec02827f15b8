"""Generating volumes with a trained latent diffusion model: the schedulers, the reverse process, and
``sample.py``'s NIfTI files and PNG mosaic."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from tqdm import tqdm

from generative.networks.nets import AutoencoderKL
from monai_diffusion.checkpoints import load_diffusion, resolve_checkpoint
from monai_diffusion.config import Config, SchedulerConfig
from monai_diffusion.data.nifti import centre_slice_affine, save_nifti
from monai_diffusion.errors import CheckpointError, ConfigError, RunError
from monai_diffusion.runs import check_new_folder, check_outside_data, existing_ancestor, make_output_folder
from monai_diffusion.runtime import Precision, resolve_device
from monai_diffusion.visualize import save_png, volume_grid

__all__ = ["make_scheduler", "sampling_generator", "generate_volumes", "sample_volumes"]

log = logging.getLogger("monai_diffusion")

MOSAIC_VOLUMES = 8  # samples shown in samples.png


def make_scheduler(config: SchedulerConfig, kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """MONAI core's DDPM (training, full sampling) or DDIM (few-step sampling) scheduler."""
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    return cls(
        num_train_timesteps=config.num_train_timesteps,
        schedule=config.schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        clip_sample=config.clip_sample,
    )


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator the sampler's per-step noise is drawn from: on the model's device (the schedulers draw
    it there), so DDPM sampling is reproducible for a seed whatever the global RNG did before."""
    kind = device.type if device.type == "cuda" else "cpu"
    return torch.Generator(device=kind).manual_seed(seed)


def generate_volumes(
    unet: nn.Module,
    autoencoder: AutoencoderKL,
    config: Config,
    scale_factor: float,
    count: int,
    steps: int,
    kind: str = "ddim",
    generator: torch.Generator | None = None,
    verbose: bool = False,
    precision: Precision | None = None,
    step_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``count`` latents with MONAI core's DDPM/DDIM scheduler and decode them.

    The reverse process is written out here rather than run through ``LatentDiffusionInferer.sample``,
    because that method draws DDPM's per-step noise from the global RNG (it passes no generator), so a
    seed would not fix the samples. The scheduler keeps its tables and timesteps on the CPU (indexing
    CPU tables with device timesteps fails on a GPU); only the latents live on the model's device.

    Args:
        unet: the diffusion UNet (its device is used).
        autoencoder: decodes the latents.
        config: the run config (scheduler, image size).
        scale_factor: the latents were multiplied by it in training.
        count: volumes to generate.
        steps: DDIM steps (DDPM always runs every training step).
        kind: ``ddim`` or ``ddpm``.
        generator: CPU generator of the initial noise (the same noise on every device).
        verbose: a progress bar over the steps.
        precision: autocast for the UNet and decoder (None: fp32).
        step_generator: generator on the model's device for DDPM's per-step noise (default: seeded from the
            initial-noise generator's next draw, so one seed fixes everything).

    Returns:
        Bx``out_channels``x[SPATIAL DIMS] volumes (float32) in the autoencoder's output range.
    """
    device = next(unet.parameters()).device
    scheduler = make_scheduler(config.diffusion.scheduler, kind)
    train_steps = config.diffusion.scheduler.num_train_timesteps
    scheduler.set_timesteps(num_inference_steps=train_steps if kind == "ddpm" else steps)
    latent_shape = autoencoder.latent_shape(tuple(config.data.image_size)[: config.autoencoder.spatial_dims])
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    latents = torch.randn((count, *latent_shape), generator=generator).to(device)
    if step_generator is None:
        step_generator = sampling_generator(int(torch.randint(0, 2**62, (1,), generator=generator)), device)
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    was_training = unet.training
    unet.eval()
    with torch.no_grad(), autocast:
        for t in tqdm(scheduler.timesteps, desc=f"{kind} sampling", disable=not verbose, leave=False):
            prediction = unet(latents, timesteps=torch.full((count,), int(t), device=device, dtype=torch.long))
            latents, _ = scheduler.step(prediction.float(), t, latents, generator=step_generator)
        volumes = autoencoder.decode_stage_2_outputs(latents / scale_factor)
    unet.train(was_training)
    return volumes.float()


def _check_disk_space(output: Path, num_samples: int, config: Config) -> None:
    """Refuse, before sampling, a request whose NIfTI files cannot fit on the disk of ``output`` (float32
    voxels; gzip saves little on them)."""
    spatial = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
    needed = num_samples * math.prod(spatial) * config.autoencoder.out_channels * 4
    existing = existing_ancestor(output)
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise RunError(f"--num-samples {num_samples}: the samples need about {needed / 1e9:,.3g} GB as NIfTI files, "
                       f"but {existing} has {free / 1e9:,.3g} GB free; generate fewer or choose another --output")


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
    """Generate ``num_samples`` volumes into the new or empty folder ``output``: ``sample_XXX.nii.gz`` (written
    batch by batch, with the affine of the training volumes) and ``samples.png`` (the first few samples).

    Returns:
        the NIfTI paths.
    """
    torch_device = resolve_device(device)
    output = Path(output)
    check_new_folder(output)
    try:
        path = resolve_checkpoint(run)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; train the diffusion model first (train_diffusion.py) or point --run at its "
                              f"run folder") from None
    unet, autoencoder, config, scale_factor, affine = load_diffusion(path, torch_device)
    trained_steps = config.diffusion.scheduler.num_train_timesteps
    if scheduler == "ddim" and steps > trained_steps:
        raise ConfigError(f"--steps {steps} (or diffusion.sampling.num_inference_steps): exceeds the "
                          f"num_train_timesteps = {trained_steps} the run {run} was trained with; use at most "
                          f"{trained_steps} steps")
    if config.data.source == "nifti":
        check_outside_data(output, config.data.paths, "--output")
    _check_disk_space(output, num_samples, config)
    make_output_folder(output)
    spatial_dims = config.autoencoder.spatial_dims
    if spatial_dims == 2:  # a 2D model's image is stored as a one-slice volume at the centre slice it learned
        affine = centre_slice_affine(affine, config.data.image_size[-1])
    generator = torch.Generator().manual_seed(seed)
    names, shown = [], []
    digits = max(3, len(str(num_samples - 1)))
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        log.info("sampling volumes %d-%d of %d (%s, %d steps)", start + 1, start + count, num_samples, scheduler,
                 config.diffusion.scheduler.num_train_timesteps if scheduler == "ddpm" else steps)
        batch = generate_volumes(unet, autoencoder, config, scale_factor, count, steps, scheduler, generator,
                                 verbose=True).cpu().clamp(0, 1)
        for volume in batch:
            name = output / f"sample_{len(names):0{digits}d}.nii.gz"
            try:
                names.append(save_nifti(volume[..., None] if spatial_dims == 2 else volume, name, affine=affine))
            except OSError as err:
                raise RunError(f"--output: cannot write {name} ({err.strerror}); {len(names)} of {num_samples} "
                               f"samples were written") from None
            if len(shown) < MOSAIC_VOLUMES:
                shown.append(volume)
    save_png(volume_grid([("samples", shown)], spatial_dims=spatial_dims), output / "samples.png")
    log.info("wrote %d NIfTI volumes and samples.png to %s", len(names), output)
    return names
