"""Stage 1: the AutoencoderKL training step (the established 3D LDM recipe) and the run that drives it.

Loss of the autoencoder (generator):
    L1(x, x̂) + kl_weight · KL(q(z|x) || N(0, I)) [+ perceptual_weight · MedicalNet distance]
    [+ adversarial_weight · least-squares patch-GAN term, after the warm-up epochs]
Loss of the discriminator: adversarial_weight · ½ (LS(D(x̂), fake) + LS(D(x), real)).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config, config_to_dict, save_config
from monai_diffusion.data import build_datasets, model_input
from monai_diffusion.metrics import ReconstructionMetrics
from monai_diffusion.perceptual import MedicalNetPerceptualLoss
from monai_diffusion.profiling import peak_rss_bytes
from monai_diffusion.training.checkpoint import checkpoint_path
from monai_diffusion.training.loop import LoopSettings, LoopState, Optimization, build_loaders, fit
from monai_diffusion.training.run import (
    RunError,
    check_run_dir,
    create_run_dir,
    differences,
    load_for_resume,
    open_writer,
    restore_loop,
    run_folder,
)
from monai_diffusion.training.runtime import Precision, Runtime, seed_everything, setup_runtime
from monai_diffusion.training.visualize import volume_grid

__all__ = ["AutoencoderTask", "kl_divergence", "train_autoencoder"]

log = logging.getLogger("monai_diffusion")


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over latent voxels and channels, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_voxel = z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1
    return 0.5 * per_voxel.flatten(1).sum(dim=1).mean()


class AutoencoderTask:
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
            "generator": torch.optim.Adam([p for p in self.autoencoder.parameters() if p.requires_grad], lr=tr.learning_rate)
        }
        if self.discriminator is not None:
            self._optimizers["discriminator"] = torch.optim.Adam(
                self.discriminator.parameters(), lr=tr.discriminator_learning_rate
            )
        spatial = tuple(config.data.image_size)[: ae_cfg.spatial_dims]
        self.metrics = ReconstructionMetrics(ae_cfg.spatial_dims, spatial, multiscale=False)

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

    def training_step(self, batch: dict[str, Any], epoch: int, optimization: Optimization) -> dict[str, float]:
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
        logs = {k: float(v.detach()) for k, v in terms.items()}
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
            logs["disc"] = float(disc_loss.detach())
            optimization.backward(tr.adversarial_weight * disc_loss, "discriminator", logs)
        return logs

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = self._images(batch)
        with self.precision.autocast():
            reconstruction = self.autoencoder.reconstruct(images)
        sums = {name: values.sum() for name, values in self.metrics(reconstruction, images).items()}
        return {**sums, "count": torch.tensor(float(len(images)))}

    def preview(self, batch: dict[str, Any]) -> np.ndarray:
        count = max(1, self.training.num_preview_volumes)
        images = self._images(batch)[:count]
        with self.precision.autocast():
            reconstruction = self.autoencoder.reconstruct(images).float().clamp(0, 1)
        return volume_grid([("input", list(images)), ("reconstruction", list(reconstruction))],
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
# the run
# ----------------------------------------------------------------------------------------------------
def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _compare_for_resume(saved: dict[str, Any], task: AutoencoderTask, config: Config, path: Path) -> None:
    architecture = differences(saved["model_args"], task.model_args, ignore=("use_checkpointing",))
    if architecture:
        raise RunError(
            f"--resume: the config changes the autoencoder architecture ({'; '.join(architecture)}) compared with "
            f"{path}; restore those keys or start a new run in another output_dir"
        )
    changed = differences(_flatten(saved["config"]), _flatten(config_to_dict(config)))
    if changed:
        log.info("resuming with changed settings: %s", "; ".join(changed))


def _peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "CUDA max allocated", torch.cuda.max_memory_allocated(device) / 2**30
    return "process peak RSS", peak_rss_bytes() / 2**30


def train_autoencoder(config: Config, resume: bool = False) -> dict[str, Any]:
    """Train the autoencoder described by ``config``; returns the run summary (also written as JSON).

    The run folder is ``<output_dir>/autoencoder`` (``<output_dir>/fast_dev_run/autoencoder`` for a
    ``fast_dev_run``, which is replaced each time) and holds ``config.yaml``, ``checkpoints/{last,best}.pt``,
    ``previews/*.png``, ``tensorboard/`` and ``summary.json``.
    """
    tr = config.autoencoder.training
    runtime = setup_runtime(config.device)
    try:
        run_dir = run_folder(config.output_dir, "autoencoder", tr.fast_dev_run)
        runtime.on_main(lambda: check_run_dir(run_dir, resume, tr.fast_dev_run), (RunError,))
        train_ds, val_ds = build_datasets(config.data, seed=config.seed, in_channels=config.autoencoder.in_channels,
                                          shard=(runtime.rank, runtime.world_size))
        if runtime.is_main:
            create_run_dir(run_dir, clear_scratch=tr.fast_dev_run and not resume)
        runtime.barrier()
        seed_everything(config.seed + runtime.rank)
        presharded = runtime.distributed and config.data.cache and config.data.source == "nifti"
        loaders = build_loaders(train_ds, val_ds, tr.batch_size, config.data.num_workers, config.seed, runtime,
                                presharded)
        precision = Precision(tr.mixed_precision, runtime.device)
        task = AutoencoderTask(config, runtime, precision)
        state = LoopState()
        if resume:
            saved = load_for_resume(run_dir, "autoencoder")
            _compare_for_resume(saved, task, config, checkpoint_path(run_dir, "last"))
            task.load_state_dict(saved)
            state = restore_loop(saved, precision, runtime, config.seed)
            del saved  # the weights now live in the task, on its device
            log.info("resumed %s at epoch %d, step %d", run_dir, state.epoch, state.global_step)
        if runtime.is_main:
            save_config(config, run_dir / "config.yaml")
        writer = open_writer(run_dir, runtime)
        settings = LoopSettings(
            n_epochs=tr.n_epochs,
            max_steps=tr.max_steps,
            accumulation_steps=tr.gradient_accumulation_steps,
            val_interval=tr.val_interval,
            fast_dev_run=tr.fast_dev_run,
            fast_dev_run_batches=tr.fast_dev_run_batches,
            log_every_n_steps=tr.log_every_n_steps,
            checkpoint_every_n_steps=tr.checkpoint_every_n_steps,
            keep_last_checkpoints=tr.keep_last_checkpoints,
        )
        started = time.perf_counter()
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        with precision.kernel_guard():
            state = fit(task, settings, runtime, precision, loaders, run_dir, state, writer)
        if writer is not None:
            writer.close()
        memory_kind, memory_gib = _peak_memory(runtime.device)
        image_size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
        latent = task.autoencoder.latent_shape(image_size)
        trained = [r for r in state.history if "volumes_per_second" in r]
        summary = {
            "run_dir": str(run_dir),
            "fast_dev_run": tr.fast_dev_run,
            "input_shape": [config.autoencoder.in_channels, *image_size],
            "latent_shape": list(latent),
            "compression": float(np.prod(image_size) * config.autoencoder.in_channels / np.prod(latent)),
            "autoencoder_parameters": sum(p.numel() for p in task.autoencoder.parameters()),
            "discriminator_parameters": sum(p.numel() for p in task.discriminator.parameters()) if task.discriminator else 0,
            "precision": precision.name,
            "world_size": runtime.world_size,
            "epochs": state.epoch,
            "optimizer_steps": state.global_step,
            "skipped_steps": state.skipped_steps,
            "best_val_l1": state.best_metric,
            "final": state.history[-1] if state.history else {},
            "peak_memory": {"kind": memory_kind, "GiB": round(memory_gib, 3)},
            "volumes_per_second": trained[-1]["volumes_per_second"] if trained else 0.0,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if runtime.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
            _log_summary(summary)
        return summary
    finally:
        runtime.close()


def _log_summary(summary: dict[str, Any]) -> None:
    final = summary["final"]
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in final.items() if k.startswith("val/"))
    lines = [
        f"run folder:   {summary['run_dir']}" + ("  (fast_dev_run)" if summary["fast_dev_run"] else ""),
        f"latent shape: {summary['latent_shape']} for input {summary['input_shape']} "
        f"({summary['compression']:.0f}x fewer values)",
        f"parameters:   autoencoder {summary['autoencoder_parameters']:,}, discriminator {summary['discriminator_parameters']:,}",
        f"training:     {summary['epochs']} epochs, {summary['optimizer_steps']} optimiser steps "
        f"({summary['skipped_steps']} skipped), {summary['precision']}, {summary['world_size']} process(es)",
        f"validation:   {metrics or 'not run'}",
        f"peak memory:  {summary['peak_memory']['GiB']:.2f} GiB ({summary['peak_memory']['kind']})",
        f"throughput:   {summary['volumes_per_second']:.2f} volumes/s; total {summary['seconds']:.0f} s",
    ]
    for line in lines:
        log.info(line)
