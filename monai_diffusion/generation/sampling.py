"""Generating volumes with a trained latent diffusion model: the schedulers, the reverse process, and
``sample.py``'s NIfTI files and PNG mosaic."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config
from monai_diffusion.config.tiles import resolve_tiles
from monai_diffusion.data.datalist import read_csv_table
from monai_diffusion.data.nifti import centre_slice_affine, save_nifti
from monai_diffusion.errors import CheckpointError, ConfigError, RunError
from monai_diffusion.generation.conditioning import Conditioning, Conditions
from monai_diffusion.generation.schedulers import ReverseProcess, make_scheduler, resolve_sampler
from monai_diffusion.runs.checkpoints import load_diffusion, resolve_checkpoint
from monai_diffusion.runs.folders import check_new_folder, check_outside_data, claim_output_folder, existing_ancestor
from monai_diffusion.runtime import Precision, fast_kernels, resolve_device
from monai_diffusion.visualize import save_png, volume_grid

__all__ = ["make_scheduler", "sampling_generator", "SamplingRequest", "generate_volumes", "sample_volumes",
           "expand_conditions"]

log = logging.getLogger("monai_diffusion")

MOSAIC_VOLUMES = 8  # samples shown in samples.png


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator the sampler's per-step noise is drawn from: on the model's device (the schedulers draw
    it there), so DDPM sampling is reproducible for a seed whatever the global RNG did before."""
    kind = device.type if device.type == "cuda" else "cpu"
    return torch.Generator(device=kind).manual_seed(seed)


@dataclass
class SamplingRequest:
    """What :func:`generate_volumes` samples: how many volumes, with which sampler, seeds, conditions and tiles.

    Attributes:
        config: the run config (scheduler, image size).
        scale_factor: the latents were multiplied by it in training.
        count: volumes to generate.
        steps: network evaluations (sampling steps); None: all training steps for ``ddpm``, else 50.
        kind: the sampler: ``auto`` (the one that suits ``config.diffusion.scheduler.type``), ``ddpm``, ``ddim``,
            ``dpm-solver++`` or ``rflow`` (see :func:`~monai_diffusion.generation.schedulers.resolve_sampler`).
        generator: CPU generator of the initial noise (the same noise on every device).
        verbose: a progress bar over the steps.
        precision: autocast for the UNet and decoder (None: fp32).
        step_generator: generator on the model's device for DDPM's per-step noise (default: seeded from the
            initial-noise generator's next draw, so one seed fixes everything).
        tile_size: decode the latents by tiles of this many output voxels per axis (default:
            ``config.inference_tile``, i.e. by tiles whenever the autoencoder trained on patches).
        tile_overlap: fraction of a tile shared with its neighbour (default: ``autoencoder.tile_overlap``).
        conditions: the ``count`` samples' conditions (a conditional model; None: unconditional).
        conditioning: the model's conditioning (for the empty conditions of classifier-free guidance).
        guidance_scale: classifier-free guidance: ``eps_uncond + scale * (eps_cond - eps_uncond)``; 1 uses the
            conditional prediction alone.
        buffers: where exact tiling keeps its activations (default: ``autoencoder.tile_buffers``); the tile
            settings are resolved by ``config.tiles.resolve_tiles``.
    """

    config: Config
    scale_factor: float
    count: int
    steps: int | None = None
    kind: str = "auto"
    generator: torch.Generator | None = None
    verbose: bool = False
    precision: Precision | None = None
    step_generator: torch.Generator | None = None
    tile_size: list[int] | None = None
    tile_overlap: float | None = None
    conditions: Conditions | None = None
    conditioning: Conditioning | None = None
    guidance_scale: float = 1.0
    buffers: str | None = None


def generate_volumes(unet: nn.Module, autoencoder: AutoencoderKL, request: SamplingRequest) -> torch.Tensor:
    """Sample ``count`` latents with one of ``monai_diffusion.generation.schedulers``' samplers and decode them.

    The reverse process is written out here rather than run through ``LatentDiffusionInferer.sample``,
    because that method draws DDPM's per-step noise from the global RNG (it passes no generator), so a
    seed would not fix the samples. The schedulers keep their tables and timesteps on the CPU (indexing
    CPU tables with device timesteps fails on a GPU); only the latents live on the model's device.

    Args:
        unet: the diffusion UNet (its device is used).
        autoencoder: decodes the latents.
        request: what to sample (see :class:`SamplingRequest`).

    Returns:
        Bx``out_channels``x[SPATIAL DIMS] volumes (float32) in the autoencoder's output range.
    """
    config, count, conditions, conditioning = request.config, request.count, request.conditions, request.conditioning
    generator, step_generator, guidance_scale = request.generator, request.step_generator, request.guidance_scale
    device = next(unet.parameters()).device
    kind, steps = resolve_sampler(config.diffusion.scheduler, request.kind, request.steps)
    latent_shape = autoencoder.latent_shape(tuple(config.data.image_size)[: config.autoencoder.spatial_dims])
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    latents = torch.randn((count, *latent_shape), generator=generator).to(device)
    if step_generator is None:
        step_generator = sampling_generator(int(torch.randint(0, 2**62, (1,), generator=generator)), device)
    process = ReverseProcess(config.diffusion.scheduler, kind, steps, latent_shape, step_generator)
    autocast = request.precision.autocast() if request.precision is not None else contextlib.nullcontext()
    was_training = unet.training
    unet.eval()
    guided = conditions is not None and conditioning is not None and guidance_scale != 1.0
    if conditions is not None:  # one forward of the conditional and the unconditional halves together
        conditions = (conditions.cat(conditioning.null(count)) if guided else conditions).to(device)
    kwargs = conditions.as_kwargs() if conditions is not None else {}
    with torch.no_grad(), autocast:
        for index in tqdm(range(len(process.timesteps)), desc=f"{kind} sampling", disable=not request.verbose,
                          leave=False):
            inputs = torch.cat([latents, latents]) if guided else latents
            timesteps = process.model_timesteps(index, len(inputs), device)
            prediction = unet(inputs, timesteps=timesteps, **kwargs).float()
            if guided:
                conditional, unconditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = process.step(prediction, index, latents)
        inferer = resolve_tiles(config, request.tile_size, request.tile_overlap, request.buffers).inferer()
        latents = latents / request.scale_factor
        volumes = inferer.decode(autoencoder, latents) if inferer is not None else autoencoder.decode(latents)
    unet.train(was_training)
    return volumes.float()


def expand_conditions(sets: Sequence[Sequence[str]] | None, csv_file: str | Path | None) -> list[dict[str, str]]:
    """Condition sets from ``--condition`` (each a list of ``name=value``; ``name=a,b`` gives one set per value,
    several such names their grid) and from ``--conditions-csv`` (one set per row; the header names them)."""
    expanded: list[dict[str, str]] = []
    for tokens in sets or []:
        choices: dict[str, list[str]] = {}
        for token in tokens:
            name, found, values = token.partition("=")
            if not found or not name.strip() or not values.strip():
                raise ConfigError(f"--condition {token!r}: expected name=value (e.g. age=70 sex=F; age=40,70 for "
                                  f"several)")
            if name.strip() in choices:
                raise ConfigError(f"--condition {token!r}: '{name.strip()}' is given twice in one set; give each "
                                  f"name once (name=a,b for several values)")
            choices[name.strip()] = [v.strip() for v in values.split(",")]
        expanded += [dict(zip(choices, combination)) for combination in itertools.product(*choices.values())]
    if csv_file is not None:
        _, rows = read_csv_table(Path(csv_file), "--conditions-csv", ConfigError)
        expanded += [{k: v.strip() for k, v in row.items()} for _, row in rows]
    return expanded


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
    scheduler: str = "auto",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "auto",
    tile_size: list[int] | None = None,
    tile_overlap: float | None = None,
    conditions: Sequence[dict[str, str]] | None = None,
    guidance_scale: float | None = None,
    buffers: str | None = None,
) -> list[Path]:
    """Generate volumes into the new or empty folder ``output``: ``sample_XXX.nii.gz`` (written batch by batch,
    with the affine of the training volumes) and ``samples.png`` (the first few samples).

    Args:
        run: diffusion run folder or checkpoint.
        num_samples: volumes to generate (per condition set, for a conditional model).
        output: results folder.
        scheduler, steps, seed, batch_size, device: as ``sample.py``'s options (``auto``: the sampler that suits the
            run's training objective; steps None: all training steps for ``ddpm``, else the run's
            ``diffusion.sampling.num_inference_steps``).
        tile_size, tile_overlap: decode by tiles (default: as the trained config says, see :func:`generate_volumes`).
        conditions: condition sets (name -> value as text) of a conditional model; each sample's conditions are
            written beside it (``sample_XXX.json``) and into ``conditions.csv``.
        guidance_scale: classifier-free guidance (default: the config's ``diffusion.sampling.guidance_scale``).
        buffers: ``--buffers``: where exact tiling keeps its activations (default: ``autoencoder.tile_buffers``).

    Returns:
        the NIfTI paths.
    """
    torch_device = resolve_device(device)
    fast_kernels(torch_device)
    output = Path(output)
    check_new_folder(output)
    try:
        path = resolve_checkpoint(run)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; train the diffusion model first (train_diffusion.py) or point --run at its "
                              f"run folder") from None
    bundle = load_diffusion(path, torch_device)
    config, conditioning = bundle.config, bundle.conditioning
    if steps is None and scheduler != "ddpm":
        steps = config.diffusion.sampling.num_inference_steps
    scheduler, steps = resolve_sampler(config.diffusion.scheduler, scheduler, steps, run)
    sets = _condition_sets(conditioning, conditions)
    scale = config.diffusion.sampling.guidance_scale if guidance_scale is None else guidance_scale
    _check_guidance(conditioning, scale, "--guidance-scale" if guidance_scale is not None else
                    "diffusion.sampling.guidance_scale")
    if tile_overlap is not None and tile_size is None and resolve_tiles(config).tile_size is None:
        raise ConfigError(f"--tile-overlap: only used with --tile-size (the run {run} decodes whole volumes); add "
                          f"--tile-size or drop --tile-overlap")
    spatial_dims = config.autoencoder.spatial_dims
    image = tuple(config.data.image_size)[:spatial_dims]
    tiles = resolve_tiles(config, tile_size, tile_overlap, buffers, check=(image, bundle.autoencoder.total_factors))
    if config.data.source == "nifti":
        check_outside_data(output, config.data.paths, "--output")
    _check_disk_space(output, num_samples * len(sets), config)
    lock = claim_output_folder(output)  # held while writing: a second sampler into it is refused
    affine = bundle.reference_affine
    if spatial_dims == 2:  # a 2D model's image is stored as a one-slice volume at the centre slice it learned
        affine = centre_slice_affine(affine, config.data.image_size[-1])
    generator = torch.Generator().manual_seed(seed)
    precision = Precision(config.diffusion.training.mixed_precision, torch_device)  # as the stage trained
    jobs = [values for values in sets for _ in range(num_samples)]  # one entry per volume: its condition set
    names, shown, rows = [], [], []
    digits = max(3, len(str(len(jobs) - 1)))
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        log.info("sampling volumes %d-%d of %d (%s, %d steps)", start + 1, start + len(chunk), len(jobs), scheduler,
                 steps)
        batch_conditions = conditioning.encode(chunk) if conditioning.active else None
        batch = generate_volumes(bundle.unet, bundle.autoencoder, SamplingRequest(
                                 config, bundle.scale_factor, len(chunk), steps,
                                 scheduler, generator, verbose=True, precision=precision, tile_size=tile_size,
                                 tile_overlap=tile_overlap,
                                 conditions=batch_conditions, conditioning=conditioning,
                                 guidance_scale=scale, buffers=buffers)).cpu().clamp(0, 1)
        for volume, values in zip(batch, chunk):
            name = output / f"sample_{len(names):0{digits}d}.nii.gz"
            try:
                names.append(save_nifti(volume[..., None] if spatial_dims == 2 else volume, name, affine=affine))
            except OSError as err:
                raise RunError(f"--output: cannot write {name} ({err.strerror}); {len(names)} of {len(jobs)} "
                               f"samples were written") from None
            if values:
                sidecar = {"conditions": values, "guidance_scale": scale, "seed": seed}
                name.with_name(name.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar, indent=2))
                rows.append({"file": name.name, **values})
            if len(shown) < MOSAIC_VOLUMES:
                shown.append(volume)
    settings = {"run": str(path), "scheduler": scheduler, "steps": steps,
                "seed": seed, "guidance_scale": scale if conditioning.active else None, "volumes": len(names),
                "tiling": tiles.summary(bundle.autoencoder, "sampling")}
    (output / "sampling.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    if rows:
        with (output / "conditions.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    save_png(volume_grid([("samples", shown)], spatial_dims=spatial_dims), output / "samples.png")
    log.info("wrote %d NIfTI volumes and samples.png to %s", len(names), output)
    lock.release()
    return names


def _check_guidance(conditioning: Conditioning, scale: float, key: str) -> None:
    """Classifier-free guidance needs a conditional model that also learned the unconditional prediction."""
    if scale == 1.0:
        return
    if not conditioning.active:
        raise ConfigError(f"{key} {scale:g}: the model is unconditional (trained without diffusion.conditioning), so "
                          f"there is nothing to guide; drop {key} (or set it to 1)")
    if conditioning.dropout == 0:
        log.warning("%s %g: the model was trained with diffusion.conditioning.dropout 0, so it never learned the "
                    "unconditional prediction that guidance mixes in; the samples may be poor (train with a dropout "
                    "such as 0.1 for guidance)", key, scale)


def _condition_sets(conditioning: Conditioning, conditions: Sequence[dict[str, str]] | None) -> list[dict[str, Any]]:
    """The checked condition sets: ``[{}]`` (one unconditional set) for an unconditional model."""
    if not conditioning.active:
        if conditions:
            raise ConfigError("--condition: this model is unconditional (trained without diffusion.conditioning); "
                              "drop --condition / --conditions-csv")
        return [{}]
    if not conditions:
        names = list(conditioning.categorical) + list(conditioning.continuous)
        raise ConfigError(f"--condition: the model is conditioned on {names}; give them, e.g. --condition "
                          + " ".join(f"{n}=..." for n in names) + " (or --conditions-csv FILE)")
    return [conditioning.parse(values, f"--condition {' '.join(f'{k}={v}' for k, v in values.items())}")
            for values in conditions]
