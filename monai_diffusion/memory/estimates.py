"""The training steps' memory: the autoencoder stage (:func:`estimate_autoencoder`) and the diffusion stage
(:func:`estimate_diffusion`), counted on fake tensors with :func:`~monai_diffusion.memory.counting.count_saved`.

Parameters, gradients and Adam's two moments are counted from the parameter tensors. What the count
cannot see is modelled and named in the report:

* the backward pass's working set (gradients of the activations being processed, recomputed inputs):
  modelled as 1.5 (2.5 with checkpointing) float32 copies of the network's largest activation, factors
  calibrated against measured CPU peaks by ``benchmarks/memory.py`` (added as ``backward working set``);
* which attention kernel the device uses: counted as the kernel this machine runs (PyTorch's SDPA, which
  both networks use: our AutoencoderKL always, the diffusion UNet through ``checkpoints.build_unet``);
* DDP (``world_size`` > 1, as under ``torchrun``): its gradient buckets, a float32 copy of the trainable
  parameters' gradients (``gradient_as_bucket_view`` is off), are counted (``ddp_buckets``);
* the caching allocator, the cuDNN/cuBLAS workspaces and the CUDA context: the margin of ``counting``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config
from monai_diffusion.config.geometry import autoencoder_totals, training_size
from monai_diffusion.memory.counting import _autocast, count_saved

__all__ = ["LevelRow", "MemoryEstimate", "estimate_autoencoder", "DiffusionEstimate", "estimate_diffusion",
           "training_batch", "ddp_world_size", "config_unet_args", "context_of"]


def ddp_world_size(world_size: int | None = None) -> int:
    """``world_size``, else the ``WORLD_SIZE`` that ``torchrun`` sets (1 for a single process)."""
    return world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class LevelRow:
    """Bytes kept for backward by the blocks that run at one resolution."""

    part: str
    resolution: tuple[int, ...]
    channels: int
    saved_bytes: int


@dataclass
class MemoryEstimate:
    """An autoencoder training step's memory, by component (bytes)."""

    latent_shape: tuple[int, ...]
    batch_size: int
    precision: str
    checkpointing: bool
    levels: list[LevelRow]
    autoencoder_activations: int
    discriminator_activations: int
    perceptual_activations: int
    backward_working_set: int
    parameters: int
    gradients: int
    optimizer_state: int
    ddp_buckets: int = 0

    @property
    def activations(self) -> int:
        return self.autoencoder_activations + self.discriminator_activations + self.perceptual_activations

    @property
    def autoencoder_step(self) -> int:
        """The autoencoder's forward + backward alone: its activations, working set, weights and gradients."""
        return self.autoencoder_activations + self.backward_working_set + self.parameters + self.gradients

    @property
    def total(self) -> int:
        return (self.activations + self.backward_working_set + self.parameters + self.gradients
                + self.optimizer_state + self.ddp_buckets)

    def contributors(self) -> list[tuple[str, int]]:
        parts = [(f"{row.part} at {'x'.join(map(str, row.resolution))} ({row.channels} ch)", row.saved_bytes)
                 for row in self.levels]
        parts += [("discriminator activations", self.discriminator_activations),
                  ("perceptual network activations", self.perceptual_activations),
                  ("backward working set", self.backward_working_set),
                  ("parameters + gradients + Adam state", self.parameters + self.gradients + self.optimizer_state),
                  ("DDP gradient buckets", self.ddp_buckets)]
        return sorted(parts, key=lambda item: -item[1])


def _block_names(model: AutoencoderKL) -> dict[str, nn.Module]:
    names = {f"encoder.{i}": b for i, b in enumerate(model.encoder.blocks)}
    names.update({f"decoder.{i}": b for i, b in enumerate(model.decoder.blocks)})
    return names


def _level_rows(model: AutoencoderKL, x: torch.Tensor, by_block: dict[str, int]) -> list[LevelRow]:
    """Group the blocks' saved bytes by the resolution and channels of their inputs."""
    shapes: dict[str, tuple[int, ...]] = {}

    def remember(name: str, args: tuple) -> None:  # a pre-hook must return None (else it replaces the input)
        shapes.setdefault(name, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: remember(n, a)) for n, m in _block_names(model).items()]
    with torch.no_grad():
        model.reconstruct(x)
    for hook in hooks:
        hook.remove()
    rows: list[LevelRow] = []
    for name, shape in shapes.items():
        part = name.split(".")[0]
        resolution, channels = shape[2:], shape[1]
        if rows and rows[-1].part == part and rows[-1].resolution == resolution:
            rows[-1].saved_bytes += by_block.get(name, 0)
            rows[-1].channels = max(rows[-1].channels, channels)
        else:
            rows.append(LevelRow(part, resolution, channels, by_block.get(name, 0)))
    return rows


def training_batch(config: Config, volumes: int | None = None) -> int:
    """Samples in one training step: volumes per step, times ``data.patches_per_volume`` on patches."""
    volumes = volumes or config.autoencoder.training.batch_size
    return volumes * (config.data.patches_per_volume if config.data.patch_size is not None else 1)


def estimate_autoencoder(
    config: Config,
    input_size: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    mixed_precision: bool | None = None,
    checkpointing: bool | None = None,
    target: str = "cuda",
    world_size: int | None = None,
) -> MemoryEstimate:
    """Count one training step of the autoencoder stage described by ``config`` on the meta device.

    Args:
        config: the run config (its ``autoencoder`` and ``data`` sections are used).
        input_size: spatial size (default: what the autoencoder trains on, ``data.patch_size`` or
            ``data.image_size``).
        batch_size: volumes per step (default ``autoencoder.training.batch_size``); each brings
            ``data.patches_per_volume`` patches when the config trains on patches.
        mixed_precision: default ``autoencoder.training.mixed_precision``.
        checkpointing: default ``autoencoder.training.use_gradient_checkpointing``.
        target: ``cuda`` or ``cpu``: whose autocast rules mixed precision follows.
        world_size: processes of a DDP job (default ``WORLD_SIZE``, as ``torchrun`` sets it, else 1); above 1
            DDP's gradient buckets are counted.
    """
    ae, tr = config.autoencoder, config.autoencoder.training
    size = tuple(input_size)[: ae.spatial_dims] if input_size else training_size(config)
    batch = training_batch(config, batch_size)
    amp = tr.mixed_precision if mixed_precision is None else mixed_precision
    ckpt = tr.use_gradient_checkpointing if checkpointing is None else checkpointing
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target = {target!r}: expected 'cuda' or 'cpu'")
    return _estimate_fake(config, size, batch, amp, ckpt, target, ddp_world_size(world_size))


def _estimate_fake(config: Config, size: tuple[int, ...], samples: int, amp: bool, ckpt: bool,
                   target: str = "cuda", world_size: int = 1) -> MemoryEstimate:
    """:func:`estimate_autoencoder` for ``samples`` inputs of ``size`` (no defaults applied)."""
    with FakeTensorMode():
        estimate = _estimate(config, tuple(size), samples, amp, ckpt, target)
    if world_size > 1:
        estimate.ddp_buckets = estimate.gradients  # DDP wraps the autoencoder and the discriminator
    return estimate


def _estimate(config: Config, size: tuple[int, ...], batch: int, amp: bool, ckpt: bool, target: str) -> MemoryEstimate:
    ae, tr = config.autoencoder, config.autoencoder.training
    model = AutoencoderKL(**ae.model_kwargs(use_checkpointing=ckpt))
    x = torch.empty((batch, ae.in_channels, *size))
    model.train()
    latent = model.latent_shape(size)
    with count_saved(_block_names(model), exclude=(model,), fake=True) as record:
        with _autocast(amp, target):
            reconstruction, z_mu, z_sigma = model(x)
            loss = F.l1_loss(reconstruction.float(), x) + (z_mu.float().pow(2) + z_sigma.float().pow(2)).mean()
    ae_saved = record.total
    levels = _level_rows(model, x, record.by_block())
    disc_saved = 0
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if tr.use_adversarial_loss:
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(spatial_dims=ae.spatial_dims, num_layers_d=ae.discriminator.num_layers_d,
                                  channels=ae.discriminator.num_channels, in_channels=ae.out_channels, out_channels=1)
        with count_saved({}, exclude=(disc,), fake=True) as disc_record, _autocast(amp, target):
            # the discriminator's own step: fake and real volumes; the outputs are kept alive so their saved
            # tensors stay allocated (and counted once) until both passes are done, as in a real step
            kept = [disc(reconstruction.detach().float())[-1].sum(), disc(x)[-1].sum()]
        disc_saved = disc_record.total
        del kept
        n_params += sum(p.numel() for p in disc.parameters())
        trainable += sum(p.numel() for p in disc.parameters())
    perceptual_saved = 0
    if tr.use_perceptual_loss:
        from monai_diffusion.evaluation.perceptual import MedicalNetResNet

        net = MedicalNetResNet(ae.perceptual.network).eval().requires_grad_(False)
        with count_saved({}, exclude=(net,), fake=True) as perceptual_record, _autocast(amp, target):
            features = net(reconstruction.float())  # kept alive until counted, as in a real step
        perceptual_saved = perceptual_record.total
        del features
        n_params += sum(p.numel() for p in net.parameters())
    del loss
    return MemoryEstimate(
        latent_shape=latent,
        batch_size=batch,
        precision=("mixed (bf16/fp16)" if amp else "fp32") + f", {target} rules",
        checkpointing=ckpt,
        levels=levels,
        autoencoder_activations=ae_saved,
        discriminator_activations=disc_saved,
        perceptual_activations=perceptual_saved,
        backward_working_set=int((2.5 if ckpt else 1.5) * 4 * record.largest_numel),
        parameters=4 * n_params,
        gradients=4 * trainable,
        optimizer_state=8 * trainable,
    )


@dataclass
class DiffusionEstimate:
    """A diffusion UNet training step on whole-volume latents, by component (bytes)."""

    latent_shape: tuple[int, ...]
    batch_size: int
    activations: int
    backward_working_set: int
    parameters: int
    gradients: int
    optimizer_state: int
    ema: int
    ddp_buckets: int = 0

    @property
    def total(self) -> int:
        return (self.activations + self.backward_working_set + self.parameters + self.gradients
                + self.optimizer_state + self.ema + self.ddp_buckets)


def config_unet_args(config: Config) -> dict[str, Any]:
    """The UNet arguments the config gives before any data are read: its UNet keys and the cross-attention of its
    continuous covariates (the classes of categorical ones come from the datalist; their embedding is small)."""
    ae, df = config.autoencoder, config.diffusion
    return {**df.unet_kwargs(ae.latent_channels, ae.spatial_dims), **df.conditioning.unet_kwargs()}


def context_of(config: Config, batch: int) -> dict[str, torch.Tensor]:
    """A cross-attention context of ``batch`` samples (``B x 1 x context_dim``) for a UNet with continuous
    covariates, as keyword arguments of its forward (none for other UNets)."""
    dim = config.diffusion.conditioning.context_dim
    return {"context": torch.zeros((batch, 1, dim))} if dim else {}


def estimate_diffusion(config: Config, batch_size: int | None = None, mixed_precision: bool | None = None,
                       target: str = "cuda", world_size: int | None = None) -> DiffusionEstimate:
    """Count one training step of the diffusion stage (MONAI's DiffusionModelUNet with SDPA attention on the
    latents of whole volumes, noise-prediction loss, Adam, EMA copy, DDP's buckets when ``world_size`` > 1)
    on fake tensors, as :func:`estimate_autoencoder` does."""
    from monai_diffusion.runs.checkpoints import build_unet

    df, ae = config.diffusion, config.autoencoder
    batch = batch_size or df.training.batch_size
    amp = df.training.mixed_precision if mixed_precision is None else mixed_precision
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    latent = (ae.latent_channels, *(s // f for s, f in zip(size, autoencoder_totals(config))))
    with FakeTensorMode():
        unet = build_unet(config_unet_args(config)).train()
        blocks = {f"down.{i}": b for i, b in enumerate(unet.down_blocks)}
        blocks.update({"middle": unet.middle_block, **{f"up.{i}": b for i, b in enumerate(unet.up_blocks)}})
        x = torch.empty((batch, *latent))
        timesteps = torch.zeros((batch,), dtype=torch.long)
        with count_saved(blocks, exclude=(unet,), fake=True) as record, _autocast(amp, target):
            loss = F.mse_loss(unet(x, timesteps=timesteps, **context_of(config, batch)).float(), x)
        del loss
        params = sum(p.numel() for p in unet.parameters())
    return DiffusionEstimate(
        latent_shape=latent, batch_size=batch, activations=record.total,
        backward_working_set=int(1.5 * 4 * record.largest_numel), parameters=4 * params, gradients=4 * params,
        optimizer_state=8 * params, ema=4 * params if df.training.ema_decay is not None else 0,
        ddp_buckets=4 * params if ddp_world_size(world_size) > 1 else 0,
    )
