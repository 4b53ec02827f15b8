"""Stage 2: a DiffusionModelUNet trained on the latents of the frozen autoencoder.

The latents come from ``monai_diffusion.generation.latents`` (encoded once, optionally cached on disk, scaled by
1 / std(z)); sampling for the previews is ``monai_diffusion.generation.sampling``'s.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config, config_to_dict
from monai_diffusion.config.schema import DiffusionTrainingConfig
from monai_diffusion.config.tiles import resolve_tiles
from monai_diffusion.data import make_loader
from monai_diffusion.data.datasets import item_covariates
from monai_diffusion.errors import CheckpointError, RunError
from monai_diffusion.generation.conditioning import Conditioning, Conditions
from monai_diffusion.generation.latents import LatentCache, cached_latents, compute_scale_factor, volumes_to_encode
from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes
from monai_diffusion.generation.schedulers import Objective
from monai_diffusion.pretrained.init_from import unet_start
from monai_diffusion.pretrained.unet import unet_differences
from monai_diffusion.runs.checkpoints import build_unet, checkpoint_path, load_autoencoder, weights_fingerprint
from monai_diffusion.runtime import Precision, Runtime
from monai_diffusion.training.loop import LoopState, Optimization, Task
from monai_diffusion.training.runner import Loaders, differences, run_stage
from monai_diffusion.visualize import volume_grid

__all__ = ["DiffusionTask", "DiffusionStage", "train_diffusion"]

log = logging.getLogger("monai_diffusion")


class DiffusionTask(Task):
    """UNet + the objective's loss (DDPM noise prediction or rectified-flow velocity) on cached, scaled latents.

    Args:
        config: the resolved run config.
        runtime: device and DDP placement.
        precision: autocast / loss scaling.
        autoencoder: the frozen, trained autoencoder (for previews and stored in checkpoints).
        scale_factor: latent scale factor.
        reference_affine: 4x4 affine of the training volumes, for NIfTI samples.
        conditioning: the conditions of a conditional model (inactive: unconditional).
    """

    monitor = "val/loss"
    trained = "unet"  # the optimiser the loss steps

    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        precision: Precision,
        autoencoder: AutoencoderKL,
        scale_factor: float,
        reference_affine: torch.Tensor,
        conditioning: Conditioning | None = None,
    ) -> None:
        df, tr = config.diffusion, config.diffusion.training
        self.config, self.runtime, self.precision, self.training = config, runtime, precision, tr
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.autoencoder_fingerprint = weights_fingerprint(self.autoencoder.state_dict())
        self.scale_factor = float(scale_factor)
        self.reference_affine = reference_affine
        self.conditioning = conditioning if conditioning is not None else Conditioning()
        self.unet_args = {**df.unet_kwargs(config.autoencoder.latent_channels, config.autoencoder.spatial_dims),
                          **self.conditioning.unet_kwargs()}
        self.unet = build_unet(self.unet_args).to(runtime.device)
        self.unet_train: nn.Module = self.unet
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.unet_train = nn.parallel.DistributedDataParallel(self.unet, device_ids=ids)
        self.ema = None
        if tr.ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tr.ema_decay)
            )
        self.objective = Objective(df.scheduler)
        self._optimizers = {"unet": torch.optim.Adam(self.unet.parameters(), lr=tr.learning_rate)}
        self._validation_generator = torch.Generator().manual_seed(config.seed)

    # -- what the loop needs -------------------------------------------------------------------------
    def ddp_modules(self) -> list[nn.Module]:
        return [self.unet_train]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def train(self, mode: bool = True) -> None:
        self.unet.train(mode)

    def _latents(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        z_mu, z_sigma = batch["z_mu"], batch["z_sigma"]
        if self.training.latent_sample == "mean":  # the posterior mean: no sigma * eps noise floor
            return (z_mu * self.scale_factor).to(self.runtime.device)
        eps = torch.randn(z_mu.shape, generator=generator) if generator is not None else torch.randn_like(z_mu)
        return ((z_mu + eps * z_sigma) * self.scale_factor).to(self.runtime.device)

    def _conditions(self, batch: dict[str, Any]) -> Conditions:
        return Conditions(batch.get("class_labels"), batch.get("context")).to(self.runtime.device)

    def _loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, model: nn.Module,
              conditions: Conditions) -> torch.Tensor:
        """The noise- or velocity-prediction loss (what MONAI's DiffusionInferer computes, written out because it
        passes no class labels to the UNet)."""
        noisy = self.objective.add_noise(latents, noise, timesteps)
        with self.precision.autocast():
            prediction = model(noisy, timesteps=timesteps, **conditions.as_kwargs())
        return F.mse_loss(prediction.float(), self.objective.target(latents, noise).float())

    def training_step(self, batch: dict[str, Any], epoch: int, optimization: Optimization) -> dict[str, torch.Tensor]:
        latents = self._latents(batch)
        noise = torch.randn_like(latents)
        timesteps = self.objective.sample_timesteps(latents)
        conditions = self.conditioning.drop(self._conditions(batch))  # some dropped: for classifier-free guidance
        loss = self._loss(latents, noise, timesteps, self._model(batch, True), conditions)
        logs = {"loss": loss.detach()}  # read by the loop once per logging interval
        optimization.backward(loss, self.trained, logs)
        return logs

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.unet)

    def sampling_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.unet

    def _model(self, batch: dict[str, Any], training: bool) -> nn.Module:
        """The network the loss runs: the (DDP) UNet in training, the sampling weights in validation (the
        ControlNet stage returns the UNet steered by the batch's label maps)."""
        return self.unet_train if training else self.sampling_model()

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        generator = self._validation_generator
        latents = self._latents(batch, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = self.objective.sample_timesteps(latents, generator)
        loss = self._loss(latents, noise, timesteps, self._model(batch, False), self._conditions(batch))
        return {"loss": loss.detach() * len(latents), "count": torch.tensor(float(len(latents)))}

    def on_validation_start(self) -> None:
        self._validation_generator.manual_seed(self.config.seed)  # the same noise at every validation

    def preview(self, batch: dict[str, Any]) -> np.ndarray:
        """Samples (with the conditions of the first validation latents, for a conditional model)."""
        generator = torch.Generator().manual_seed(self.config.seed)
        count = max(1, self.training.num_preview_samples)
        conditions = self._conditions(batch).index(slice(0, count)) if self.conditioning.active else None
        if conditions is not None:
            count = len(conditions)
        volumes = generate_volumes(self.sampling_model(), self.autoencoder, SamplingRequest(
                                   self.config, self.scale_factor, count,
                                   self.training.preview_inference_steps, "auto", generator, precision=self.precision,
                                   conditions=conditions, conditioning=self.conditioning))
        return volume_grid([("samples", list(volumes.clamp(0, 1)))], spatial_dims=self.config.autoencoder.spatial_dims)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": "diffusion",
            "config": config_to_dict(self.config),
            "unet_args": self.unet_args,
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizers": {name: opt.state_dict() for name, opt in self._optimizers.items()},
            "scale_factor": self.scale_factor,
            "reference_affine": self.reference_affine,
            "autoencoder_args": {**self.autoencoder.init_args, "use_checkpointing": False},
            "autoencoder": self.autoencoder.state_dict(),
            "autoencoder_fingerprint": self.autoencoder_fingerprint,
            "conditioning": self.conditioning.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"], strict=True)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self._optimizers["unet"].load_state_dict(state["optimizers"]["unet"])
        for group in self._optimizers["unet"].param_groups:
            group["lr"] = self.training.learning_rate


def _load_frozen_autoencoder(config: Config, device: torch.device) -> tuple[AutoencoderKL, Path]:
    source = config.autoencoder_source
    try:
        model, _ = load_autoencoder(source, map_location=device, key="diffusion.autoencoder_run")
    except CheckpointError as err:
        raise RunError(f"{err}; train the autoencoder first (train_autoencoder.py) or point "
                       f"diffusion.autoencoder_run at its run folder") from None
    expected = {k: v for k, v in config.autoencoder.model_kwargs().items() if k != "use_checkpointing"}
    found = {k: model.init_args.get(k) for k in expected}
    mismatch = differences(found, expected)
    if mismatch:
        raise RunError(
            f"diffusion.autoencoder_run: the autoencoder in {source} does not match the config's autoencoder "
            f"section ({'; '.join(mismatch)}); use the config it was trained with ({source}/config.yaml)"
        )
    return model, source


def _check_same_autoencoder(saved: dict[str, Any], autoencoder: AutoencoderKL, source: Path, run_dir: Path) -> None:
    """Refuse a resume whose autoencoder is no longer the one the run's UNet, scale factor and latents were
    made with (e.g. the autoencoder was trained further in place)."""
    stored = saved.get("autoencoder_fingerprint") or weights_fingerprint(saved["autoencoder"])
    if stored != weights_fingerprint(autoencoder.state_dict()):
        raise RunError(
            f"--resume: the autoencoder in {source} has changed since the diffusion run {run_dir} started (its "
            f"weights differ from those in the run's checkpoint), so the UNet and scale factor no longer fit it; "
            f"start a new diffusion run without --resume in a new output_dir (set diffusion.autoencoder_run={source})"
        )


def _differing_conditions(stored: Conditioning, fitted: Conditioning) -> list[str]:
    changes = []
    for name in sorted({*stored.categorical, *fitted.categorical}):
        before, after = stored.categorical.get(name), fitted.categorical.get(name)
        if before != after:
            unseen = sorted(set(after or []) - set(before or []))
            changes.append(f"'{name}' classes {before} -> {after}" + (f" (unseen: {unseen})" if unseen else ""))
    for name in sorted({*stored.continuous, *fitted.continuous}):
        before, after = stored.continuous.get(name), fitted.continuous.get(name)
        if before is None or after is None or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                                                       for a, b in zip(before, after)):
            show = [None if v is None else f"{v[0]:.4g} ± {v[1]:.4g}" for v in (before, after)]
            changes.append(f"'{name}' normalisation {show[0]} -> {show[1]}")
    return changes


def _fit_conditioning(config: Config, train_ds: Dataset) -> Conditioning:
    """The conditioning the training set's covariates give (no image is read)."""
    cond = config.diffusion.conditioning
    items = [item_covariates(train_ds, i) for i in range(len(train_ds))]
    return Conditioning.fit(cond.categorical, cond.continuous, cond.dropout, items, cond.standardize,
                            cond.presence_flag)


def _check_same_conditioning(stored: Conditioning, fitted: Conditioning, path: Path) -> None:
    """A resumed run keeps the conditioning it was trained with: a datalist whose covariates now give other
    classes or another normalisation would silently re-map what the UNet learned."""
    changes = _differing_conditions(stored, fitted)
    if changes:
        raise RunError(f"--resume: the datalist's covariates no longer match the conditioning stored in {path} "
                       f"({'; '.join(changes)}); restore the datalist the run was trained with, or start a new "
                       f"diffusion run without --resume in a new output_dir")


# ----------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------

def latent_loaders(latents: LatentCache, batch_size: int, seed: int, runtime: Runtime) -> Loaders:
    """Loaders of one rank's cached latents (its own share, reshuffled every epoch with its own seed; the
    validation latents in order), as the diffusion and ControlNet stages read them."""
    pin = runtime.device.type == "cuda"
    sampler = torch.utils.data.DistributedSampler(latents.train, num_replicas=1, rank=0, shuffle=True,
                                                  seed=seed + runtime.rank)
    return (make_loader(latents.train, batch_size, False, 0, seed, sampler=sampler, pin_memory=pin),
            make_loader(latents.val, batch_size, False, 0, seed, pin_memory=pin),
            sampler)

class DiffusionStage:
    """Stage 2 for :func:`~monai_diffusion.training.runner.run_stage`."""

    name = "diffusion"

    def __init__(self) -> None:
        self.autoencoder: AutoencoderKL | None = None
        self.source: Path | None = None
        self.latents: LatentCache | None = None
        self.volumes: tuple[Dataset, Dataset] | None = None

    def section(self, config: Config) -> DiffusionTrainingConfig:
        return config.diffusion.training

    def check_inputs(self, config: Config, runtime: Runtime) -> None:
        self.autoencoder, self.source = _load_frozen_autoencoder(config, runtime.device)
        self.volumes = volumes_to_encode(config)

    def build(self, config: Config, runtime: Runtime, precision: Precision, run_dir: Path,
              saved: dict[str, Any] | None) -> tuple[DiffusionTask, Loaders]:
        tr = config.diffusion.training
        if saved is not None:  # before encoding anything: the autoencoder and the conditions of the run
            _check_same_autoencoder(saved, self.autoencoder, self.source, run_dir)
            _check_same_conditioning(Conditioning.from_state(saved.get("conditioning")),
                                     _fit_conditioning(config, self.volumes[0]), checkpoint_path(run_dir, "last"))
        self.latents = latents = cached_latents(config, runtime, self.autoencoder, self.source, run_dir, self.volumes)
        if saved is not None:
            scale_factor = saved["scale_factor"]
        else:
            scale_factor = compute_scale_factor(latents.train, tr.scale_factor_batches, tr.batch_size, runtime,
                                                config.seed, mean=tr.latent_sample == "mean")
        task = DiffusionTask(config, runtime, precision, self.autoencoder, scale_factor, latents.affine,
                             latents.conditioning)
        if saved is None and config.diffusion.init_from:  # fine-tuning: its weights and scale factor
            _, task.scale_factor = unet_start(task.unet, task.unet_args, config.diffusion.init_from, task.ema,
                                              conditioning=task.conditioning)
        log.info("latent scale factor: %.4f", task.scale_factor)
        return task, latent_loaders(latents, tr.batch_size, config.seed, runtime)

    def check_resume(self, saved: dict[str, Any], task: DiffusionTask, config: Config, path: Path) -> None:
        changed = unet_differences(saved["unet_args"], task.unet_args)  # an argument left out: its default
        if changed:
            raise RunError(f"--resume: the config changes the UNet architecture ({'; '.join(changed)}) compared with "
                           f"{path}; restore those keys or start a new run in another output_dir")

    def summary(self, config: Config, task: DiffusionTask, state: LoopState) -> dict[str, Any]:
        latents = self.latents
        epochs_run = max(state.epoch, 1)
        share = len(latents.train) / max(len(latents.train) + len(latents.val), 1)
        return {
            "autoencoder": str(self.source),
            "latent_shape": list(task.autoencoder.latent_shape(
                tuple(config.data.image_size)[: config.autoencoder.spatial_dims])),
            "scale_factor": task.scale_factor,
            "latent_tiling": resolve_tiles(config).summary(task.autoencoder, "latent encoding"),
            "unet_parameters": sum(p.numel() for p in task.unet.parameters()),
            "latent_cache": {
                "encode_seconds": round(latents.encode_seconds, 2),
                "reused_from_disk": latents.reused,
                "encoder_seconds_saved_estimate": round(latents.encode_seconds * share * (epochs_run - 1), 2),
            },
        }

    def describe(self, summary: dict[str, Any]) -> list[str]:
        cache = summary["latent_cache"]
        return [
            f"latent shape: {summary['latent_shape']}, scale factor {summary['scale_factor']:.4f}, UNet parameters "
            f"{summary['unet_parameters']:,}",
            f"latent cache: encoded once in {cache['encode_seconds']:.1f} s; re-encoding the training set every epoch "
            f"would have cost about {cache['encoder_seconds_saved_estimate']:.1f} s more",
        ]


def train_diffusion(config: Config, resume: bool = False) -> dict[str, Any]:
    """Train the latent diffusion UNet; returns the run summary (also written as JSON).

    The run folder is ``<output_dir>/diffusion`` (``<output_dir>/fast_dev_run/diffusion`` for a
    ``fast_dev_run``) and holds ``config.yaml``, ``checkpoints/{last,best}.pt`` (UNet, EMA, optimiser,
    scale factor and the frozen autoencoder, so a checkpoint is all ``sample.py`` needs), ``previews/``,
    ``tensorboard/`` and ``summary.json``.
    """
    return run_stage(DiffusionStage(), config, resume)
