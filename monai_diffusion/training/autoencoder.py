"""Stage 1: the AutoencoderKL training step (the established 3D LDM recipe) and the run that drives it.

Loss of the autoencoder (generator):
    L1(x, x̂) + kl_weight · KL(q(z|x) || N(0, I)) [+ perceptual_weight · MedicalNet distance]
    [+ adversarial_weight · least-squares patch-GAN term, after the warm-up epochs]
Loss of the discriminator: adversarial_weight · ½ (LS(D(x̂), fake) + LS(D(x), real)).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch.utils.data import Dataset

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config, config_to_dict
from monai_diffusion.config.schema import AutoencoderTrainingConfig
from monai_diffusion.config.tiles import resolve_tiles
from monai_diffusion.data import build_datasets, model_input
from monai_diffusion.data.loaders import training_loaders
from monai_diffusion.errors import RunError
from monai_diffusion.evaluation.metrics import ReconstructionMetrics
from monai_diffusion.evaluation.perceptual import MedicalNetPerceptualLoss
from monai_diffusion.pretrained.init_from import autoencoder_start
from monai_diffusion.runtime import Precision, Runtime
from monai_diffusion.training.loop import LoopState, Optimization, Task
from monai_diffusion.training.runner import Loaders, differences, flatten, run_stage
from monai_diffusion.visualize import volume_grid

__all__ = ["AutoencoderTask", "AutoencoderStage", "kl_divergence", "train_autoencoder"]

log = logging.getLogger("monai_diffusion")


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over latent voxels and channels, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_voxel = z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1
    return 0.5 * per_voxel.flatten(1).sum(dim=1).mean()


class AutoencoderTask(Task):
    """AutoencoderKL + PatchDiscriminator (+ perceptual network) and their losses.

    Args:
        config: the resolved run config.
        runtime: device and DDP placement.
        precision: autocast / loss scaling.
    """

    monitor = "val/l1"

    def __init__(self, config: Config, runtime: Runtime, precision: Precision) -> None:
        ae_cfg, tr = config.autoencoder, config.autoencoder.training
        self.config, self.runtime, self.precision, self.training = config, runtime, precision, tr
        device = runtime.device
        self.model_args = ae_cfg.model_kwargs()
        self.autoencoder = AutoencoderKL(**self.model_args).to(device)
        self.discriminator: nn.Module | None = None
        if tr.use_adversarial_loss:
            disc = PatchDiscriminator(
                spatial_dims=ae_cfg.spatial_dims,
                num_layers_d=ae_cfg.discriminator.num_layers_d,
                channels=ae_cfg.discriminator.num_channels,
                in_channels=ae_cfg.out_channels,
                out_channels=1,
            )
            if runtime.distributed and device.type == "cuda":  # SyncBatchNorm needs GPU tensors
                disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
            self.discriminator = disc.to(device)
        self.perceptual = (
            MedicalNetPerceptualLoss(ae_cfg.perceptual.network, ae_cfg.perceptual.weights_path).to(device)
            if tr.use_perceptual_loss
            else None
        )
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
        self.ae_train: nn.Module = self.autoencoder
        self.disc_train: nn.Module | None = self.discriminator
        if runtime.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.ae_train = nn.parallel.DistributedDataParallel(self.autoencoder, device_ids=ids)
            if self.discriminator is not None:
                self.disc_train = nn.parallel.DistributedDataParallel(self.discriminator, device_ids=ids)
        self._optimizers = {
            "generator": torch.optim.Adam([p for p in self.autoencoder.parameters() if p.requires_grad],
                                          lr=tr.learning_rate)
        }
        if self.discriminator is not None:
            self._optimizers["discriminator"] = torch.optim.Adam(
                self.discriminator.parameters(), lr=tr.discriminator_learning_rate
            )
        spatial = tuple(config.data.image_size)[: ae_cfg.spatial_dims]
        self.metrics = ReconstructionMetrics(ae_cfg.spatial_dims, spatial, multiscale=False)
        self.tiles = resolve_tiles(config).inferer()  # whole validation volumes run by tiles (None: at once)
        self._shown: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- what the loop needs -------------------------------------------------------------------------
    def ddp_modules(self) -> list[nn.Module]:
        return [m for m in (self.ae_train, self.disc_train) if m is not None]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def train(self, mode: bool = True) -> None:
        self.autoencoder.train(mode)
        if self.discriminator is not None:
            self.discriminator.train(mode)

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        images = model_input(batch["image"], self.config.autoencoder.spatial_dims)
        return images.to(self.runtime.device, non_blocking=True).float()

    def training_step(self, batch: dict[str, Any], epoch: int, optimization: Optimization) -> dict[str, torch.Tensor]:
        tr = self.training
        images = self._images(batch)
        adversarial = self.discriminator is not None and epoch >= tr.adversarial_warmup_epochs
        # generator: reconstruction, KL, perceptual and (after warm-up) adversarial terms
        with self.precision.autocast():
            reconstruction, z_mu, z_sigma = self.ae_train(images)
            recon = reconstruction.float()
            terms = {"l1": F.l1_loss(recon, images), "kl": kl_divergence(z_mu, z_sigma)}
            loss = terms["l1"] + tr.kl_weight * terms["kl"]
            if self.perceptual is not None:
                terms["perceptual"] = self.perceptual(recon, images)
                loss = loss + tr.perceptual_weight * terms["perceptual"]
            if adversarial:
                self.discriminator.requires_grad_(False)  # its weights are not the generator's to change
                logits = self.discriminator(recon.contiguous())[-1]
                self.discriminator.requires_grad_(True)
                terms["gen_adv"] = self.adversarial_loss(logits, target_is_real=True, for_discriminator=False)
                loss = loss + tr.adversarial_weight * terms["gen_adv"]
        logs = {k: v.detach() for k, v in terms.items()}  # read by the loop once per logging interval
        optimization.backward(loss, "generator", logs)
        # discriminator: tell real volumes from reconstructions
        if adversarial:
            with self.precision.autocast():
                fake = self.disc_train(recon.detach().contiguous())[-1]
                real = self.disc_train(images.contiguous())[-1]
                disc_loss = 0.5 * (
                    self.adversarial_loss(fake, target_is_real=False, for_discriminator=True)
                    + self.adversarial_loss(real, target_is_real=True, for_discriminator=True)
                )
            logs["disc"] = disc_loss.detach()
            optimization.backward(tr.adversarial_weight * disc_loss, "discriminator", logs)
        return logs

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Whole validation volumes, reconstructed by tiles when the config runs the autoencoder by tiles
        (``Config.inference_tile``: always after patch training)."""
        images = self._images(batch)
        with self.precision.autocast():
            reconstruction = (self.autoencoder.reconstruct(images) if self.tiles is None
                              else self.tiles.reconstruct(self.autoencoder, images))
        self._shown = (images, reconstruction)  # for the preview of this batch
        sums = {name: values.sum() for name, values in self.metrics(reconstruction, images).items()}
        return {**sums, "count": torch.tensor(float(len(images)))}

    def preview(self, batch: dict[str, Any]) -> np.ndarray:
        """Input and reconstruction of the batch :meth:`validation_step` has just reconstructed."""
        count = max(1, self.training.num_preview_volumes)
        images, reconstruction = (t[:count].float() for t in self._shown)
        return volume_grid([("input", list(images)), ("reconstruction", list(reconstruction.clamp(0, 1)))],
                           spatial_dims=self.config.autoencoder.spatial_dims)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": "autoencoder",
            "model_args": self.model_args,
            "config": config_to_dict(self.config),
            "autoencoder": self.autoencoder.state_dict(),
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "optimizers": {name: opt.state_dict() for name, opt in self._optimizers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.autoencoder.load_state_dict(state["autoencoder"], strict=True)
        if self.discriminator is not None and state.get("discriminator") is not None:
            self.discriminator.load_state_dict(state["discriminator"], strict=True)
        for name, opt in self._optimizers.items():
            if name in state["optimizers"]:
                opt.load_state_dict(state["optimizers"][name])
        lrs = {"generator": self.training.learning_rate, "discriminator": self.training.discriminator_learning_rate}
        for name, opt in self._optimizers.items():  # a changed learning rate in the config takes effect
            for group in opt.param_groups:
                group["lr"] = lrs[name]


# ----------------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------------
class AutoencoderStage:
    """Stage 1 for :func:`~monai_diffusion.training.runner.run_stage`."""

    name = "autoencoder"

    def __init__(self) -> None:
        self.datasets: tuple[Dataset, Dataset] | None = None

    def section(self, config: Config) -> AutoencoderTrainingConfig:
        return config.autoencoder.training

    def check_inputs(self, config: Config, runtime: Runtime) -> None:
        # finding and checking the files (headers) here refuses bad data before the run folder exists
        self.datasets = build_datasets(config.data, seed=config.seed, in_channels=config.autoencoder.in_channels,
                                       shard=(runtime.rank, runtime.world_size))

    def build(self, config: Config, runtime: Runtime, precision: Precision, run_dir: Path,
              saved: dict[str, Any] | None) -> tuple[AutoencoderTask, Loaders]:
        tr = config.autoencoder.training
        loaders = training_loaders(config.data, self.datasets, tr.batch_size, config.seed, runtime,
                                   config.autoencoder.in_channels)
        task = AutoencoderTask(config, runtime, precision)
        if saved is None and config.autoencoder.init_from:  # fine-tuning: its weights, all else fresh
            autoencoder_start(task.autoencoder, config.autoencoder.init_from)
        return task, loaders

    def check_resume(self, saved: dict[str, Any], task: AutoencoderTask, config: Config, path: Path) -> None:
        architecture = differences(saved["model_args"], task.model_args, ignore=("use_checkpointing",))
        saved_disc = saved.get("config", {}).get("autoencoder", {}).get("discriminator")
        if saved.get("discriminator") is not None and task.discriminator is not None and isinstance(saved_disc, dict):
            # its weights are resumed too (a discriminator switched on or off on resume starts fresh or is dropped)
            now = config_to_dict(config.autoencoder.discriminator)
            architecture += [f"discriminator.{line}" for line in differences(saved_disc, now)]
        if architecture:
            raise RunError(
                f"--resume: the config changes the autoencoder architecture ({'; '.join(architecture)}) compared "
                f"with {path}; restore those keys or start a new run in another output_dir"
            )
        changed = differences(flatten(saved["config"]), flatten(config_to_dict(config)))
        if changed:
            log.info("resuming with changed settings: %s", "; ".join(changed))

    def summary(self, config: Config, task: AutoencoderTask, state: LoopState) -> dict[str, Any]:
        image_size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
        latent = task.autoencoder.latent_shape(image_size)
        return {
            "input_shape": [config.autoencoder.in_channels, *image_size],
            "latent_shape": list(latent),
            "compression": float(np.prod(image_size) * config.autoencoder.in_channels / np.prod(latent)),
            "autoencoder_parameters": sum(p.numel() for p in task.autoencoder.parameters()),
            "discriminator_parameters": (sum(p.numel() for p in task.discriminator.parameters())
                                         if task.discriminator else 0),
            "validation_tiling": resolve_tiles(config).summary(task.autoencoder, "validation"),
        }

    def describe(self, summary: dict[str, Any]) -> list[str]:
        return [
            f"latent shape: {summary['latent_shape']} for input {summary['input_shape']} "
            f"({summary['compression']:.0f}x fewer values)",
            f"parameters:   autoencoder {summary['autoencoder_parameters']:,}, discriminator "
            f"{summary['discriminator_parameters']:,}",
        ]


def train_autoencoder(config: Config, resume: bool = False) -> dict[str, Any]:
    """Train the autoencoder described by ``config``; returns the run summary (also written as JSON).

    The run folder is ``<output_dir>/autoencoder`` (``<output_dir>/fast_dev_run/autoencoder`` for a
    ``fast_dev_run``, which is replaced each time) and holds ``config.yaml``, ``checkpoints/{last,best}.pt``,
    ``previews/*.png``, ``tensorboard/`` and ``summary.json``.
    """
    return run_stage(AutoencoderStage(), config, resume)
