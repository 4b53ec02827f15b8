"""Stage 2: a DiffusionModelUNet trained on the latents of the frozen autoencoder.

The training set is encoded once (mean and standard deviation of q(z|x) per volume) and the UNet trains
from that cache, drawing a fresh latent sample z = mu + sigma * eps each time, instead of running the
frozen encoder every epoch. Latents are multiplied by the scale factor 1 / std(z) (Rombach et al.), which
is computed over a few batches, reduced across ranks under DDP, and stored in every checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch.utils.data import Dataset
from tqdm import tqdm

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config, SchedulerConfig, config_to_dict, save_config
from monai_diffusion.data import build_datasets, make_loader
from monai_diffusion.metrics import latent_std
from monai_diffusion.profiling import peak_rss_bytes
from monai_diffusion.training.checkpoint import CheckpointError, load_autoencoder
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
from monai_diffusion.training.loop import EpochShuffleSampler, LoopSettings, LoopState, Optimization, fit
from monai_diffusion.training.runtime import Precision, Runtime, seed_everything, setup_runtime
from monai_diffusion.training.visualize import volume_grid

__all__ = ["DiffusionTask", "LatentDataset", "make_scheduler", "train_diffusion", "encode_latents", "generate_volumes",
           "sampling_generator"]

log = logging.getLogger("monai_diffusion")


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


class LatentDataset(Dataset):
    """Cached latent distributions: items ``{"z_mu": CxL..., "z_sigma": CxL...}``."""

    def __init__(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> None:
        self.z_mu, self.z_sigma = z_mu, z_sigma

    def __len__(self) -> int:
        return len(self.z_mu)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"z_mu": self.z_mu[index], "z_sigma": self.z_sigma[index]}


def _shard(count: int, runtime: Runtime, pad: bool = True) -> list[int]:
    """This rank's indices; ``pad``: repeated like DistributedSampler so every rank gets the same number
    (training), else each index exactly once over all ranks (validation, so its loss does not depend on
    the number of processes)."""
    indices = list(range(count))
    if pad:
        per_rank = -(-count // runtime.world_size)
        indices += indices[: per_rank * runtime.world_size - count]
    return indices[runtime.rank :: runtime.world_size]


def encode_latents(
    autoencoder: AutoencoderKL, dataset: Dataset, indices: list[int], batch_size: int, device: torch.device, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``dataset[indices]`` once; returns ``(z_mu, z_sigma)`` on the CPU, each NxCx[LATENT DIMS]."""
    mus, sigmas = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(indices), batch_size), desc=desc, leave=False):
            images = torch.stack([dataset[i]["image"] for i in indices[start : start + batch_size]]).to(device)
            z_mu, z_sigma = autoencoder.encode(images.float())
            mus.append(z_mu.float().cpu())
            sigmas.append(z_sigma.float().cpu())
    if not mus:  # a rank without validation volumes
        return torch.empty(0), torch.empty(0)
    return torch.cat(mus), torch.cat(sigmas)


class DiffusionTask:
    """UNet + DDPM noise-prediction loss on cached, scaled latents.

    Args:
        config: the resolved run config.
        runtime: device and DDP placement.
        precision: autocast / loss scaling.
        autoencoder: the frozen, trained autoencoder (for previews and stored in checkpoints).
        scale_factor: latent scale factor.
        reference_affine: 4x4 affine of the training volumes, for NIfTI samples.
    """

    monitor = "val/loss"

    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        precision: Precision,
        autoencoder: AutoencoderKL,
        scale_factor: float,
        reference_affine: torch.Tensor,
    ) -> None:
        df, tr = config.diffusion, config.diffusion.training
        self.config, self.runtime, self.precision, self.training = config, runtime, precision, tr
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.reference_affine = reference_affine
        self.unet_args = df.unet_kwargs(config.autoencoder.latent_channels, config.autoencoder.spatial_dims)
        self.unet = DiffusionModelUNet(**self.unet_args).to(runtime.device)
        self.unet_train: nn.Module = self.unet
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.unet_train = nn.parallel.DistributedDataParallel(self.unet, device_ids=ids)
        self.ema = None
        if tr.ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tr.ema_decay)
            )
        self.scheduler = make_scheduler(df.scheduler, "ddpm")
        self.inferer = DiffusionInferer(self.scheduler)
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
        eps = torch.randn(z_mu.shape, generator=generator) if generator is not None else torch.randn_like(z_mu)
        return ((z_mu + eps * z_sigma) * self.scale_factor).to(self.runtime.device)

    def _loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, model: nn.Module) -> torch.Tensor:
        with self.precision.autocast():
            prediction = self.inferer(inputs=latents, diffusion_model=model, noise=noise, timesteps=timesteps)
        return F.mse_loss(prediction.float(), noise.float())

    def training_step(self, batch: dict[str, Any], epoch: int, optimization: Optimization) -> dict[str, float]:
        latents = self._latents(batch)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (len(latents),), device=latents.device)
        loss = self._loss(latents, noise, timesteps, self.unet_train)
        logs = {"loss": float(loss.detach())}
        optimization.backward(loss, "unet", logs)
        return logs

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.unet)

    def sampling_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.unet

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        generator = self._validation_generator
        latents = self._latents(batch, generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (len(latents),), generator=generator)
        loss = self._loss(latents, noise, timesteps.to(latents.device), self.sampling_model())
        return {"loss": loss.detach() * len(latents), "count": torch.tensor(float(len(latents)))}

    def on_validation_start(self) -> None:
        self._validation_generator.manual_seed(self.config.seed)  # the same noise at every validation

    def generate(self, count: int, steps: int, kind: str = "ddim", generator: torch.Generator | None = None,
                 verbose: bool = False) -> torch.Tensor:
        """Sample ``count`` volumes: BxCx[SPATIAL DIMS] in the autoencoder's output range."""
        return generate_volumes(self.sampling_model(), self.autoencoder, self.config, self.scale_factor,
                                count, steps, kind, generator, verbose, self.precision)

    def preview(self, batch: dict[str, Any]) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.config.seed)
        volumes = self.generate(max(1, self.training.num_preview_samples), self.training.preview_inference_steps,
                                generator=generator)
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
            "autoencoder_args": {**_autoencoder_args(self.autoencoder), "use_checkpointing": False},
            "autoencoder": self.autoencoder.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"], strict=True)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self._optimizers["unet"].load_state_dict(state["optimizers"]["unet"])
        for group in self._optimizers["unet"].param_groups:
            group["lr"] = self.training.learning_rate


def _autoencoder_args(model: AutoencoderKL) -> dict[str, Any]:
    return dict(model.init_args)


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
        step_generator: generator on the model's device for DDPM's per-step noise (default: from the
            initial-noise generator's next draw, so one seed fixes everything).

    Returns:
        BxCx[SPATIAL DIMS] volumes (float32) in the autoencoder's output range.
    """
    device = next(unet.parameters()).device
    scheduler = make_scheduler(config.diffusion.scheduler, kind)
    scheduler.set_timesteps(num_inference_steps=config.diffusion.scheduler.num_train_timesteps if kind == "ddpm" else steps)
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


# ----------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------
def _load_frozen_autoencoder(config: Config, device: torch.device) -> tuple[AutoencoderKL, Path]:
    source = config.autoencoder_source
    try:
        model, trained_config = load_autoencoder(source, map_location=device)
    except CheckpointError as err:
        raise RunError(
            f"diffusion.autoencoder_run: {err}; train the autoencoder first (train_autoencoder.py) or point "
            f"diffusion.autoencoder_run at its run folder"
        ) from None
    expected = {k: v for k, v in config.autoencoder.model_kwargs().items() if k != "use_checkpointing"}
    found = {k: model.init_args.get(k) for k in expected}
    mismatch = differences(found, expected)
    if mismatch:
        raise RunError(
            f"diffusion.autoencoder_run: the autoencoder in {source} does not match the config's autoencoder "
            f"section ({'; '.join(mismatch)}); use the config it was trained with ({source}/config.yaml)"
        )
    return model, source


def _latent_cache(
    config: Config, runtime: Runtime, autoencoder: AutoencoderKL, source: Path, run_dir: Path
) -> tuple[LatentDataset, LatentDataset, torch.Tensor, dict[str, float]]:
    """Encode (or reload) this rank's share of the training and validation sets."""
    tr = config.diffusion.training
    # every volume is read once, to be encoded: nothing to gain from data.cache here
    data = dataclasses.replace(config.data, cache=False)
    train_ds, val_ds = build_datasets(data, seed=config.seed, in_channels=config.autoencoder.in_channels)
    fingerprint = json.dumps({"autoencoder": str(Path(source).resolve()), "data": config_to_dict(config.data),
                              "rank": runtime.rank, "world": runtime.world_size, "seed": config.seed}, sort_keys=True)
    cache_file = run_dir / f"latent_cache_rank{runtime.rank}.pt"
    if tr.cache_latents_on_disk and cache_file.is_file():
        cached = torch.load(cache_file, map_location="cpu", weights_only=True)
        if cached.get("fingerprint") == fingerprint:
            log.info("latent cache: reusing %s", cache_file)
            return (LatentDataset(cached["train_mu"], cached["train_sigma"]),
                    LatentDataset(cached["val_mu"], cached["val_sigma"]), cached["affine"],
                    {"encode_seconds": 0.0, "reused": 1.0})
    started = time.perf_counter()
    batch = config.autoencoder.training.batch_size
    train_mu, train_sigma = encode_latents(autoencoder, train_ds, _shard(len(train_ds), runtime), batch,
                                           runtime.device, "encoding training set")
    val_mu, val_sigma = encode_latents(autoencoder, val_ds, _shard(len(val_ds), runtime, pad=False), batch,
                                       runtime.device, "encoding validation set")
    seconds = time.perf_counter() - started
    affine = torch.as_tensor(train_ds[0].get("affine", torch.eye(4)), dtype=torch.float64)
    if tr.cache_latents_on_disk:
        torch.save({"fingerprint": fingerprint, "train_mu": train_mu, "train_sigma": train_sigma, "val_mu": val_mu,
                    "val_sigma": val_sigma, "affine": affine}, cache_file)
    return (LatentDataset(train_mu, train_sigma), LatentDataset(val_mu, val_sigma), affine,
            {"encode_seconds": seconds, "reused": 0.0})


def compute_scale_factor(dataset: LatentDataset, batches: int, batch_size: int, runtime: Runtime, seed: int) -> float:
    """1 / std of sampled latents over ``batches`` batches, with sums reduced across ranks."""
    generator = torch.Generator().manual_seed(seed)
    count = min(len(dataset), batches * batch_size)
    z = dataset.z_mu[:count] + torch.randn(dataset.z_mu[:count].shape, generator=generator) * dataset.z_sigma[:count]
    z = z.double()
    totals = runtime.all_reduce_sum(torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), dtype=torch.float64)]))
    return float(1.0 / latent_std(*totals.tolist()))


def train_diffusion(config: Config, resume: bool = False) -> dict[str, Any]:
    """Train the latent diffusion UNet; returns the run summary (also written as JSON).

    The run folder is ``<output_dir>/diffusion`` (``<output_dir>/fast_dev_run/diffusion`` for a
    ``fast_dev_run``) and holds ``config.yaml``, ``checkpoints/{last,best}.pt`` (UNet, EMA, optimiser,
    scale factor and the frozen autoencoder, so a checkpoint is all ``sample.py`` needs), ``previews/``,
    ``tensorboard/`` and ``summary.json``.
    """
    tr = config.diffusion.training
    runtime = setup_runtime(config.device)
    try:
        run_dir = run_folder(config.output_dir, "diffusion", tr.fast_dev_run)
        runtime.on_main(lambda: check_run_dir(run_dir, resume, tr.fast_dev_run), (RunError,))
        autoencoder, source = _load_frozen_autoencoder(config, runtime.device)
        if runtime.is_main:
            create_run_dir(run_dir, clear_scratch=tr.fast_dev_run and not resume)
        runtime.barrier()
        seed_everything(config.seed + runtime.rank)
        train_latents, val_latents, affine, cache_info = _latent_cache(config, runtime, autoencoder, source, run_dir)
        precision = Precision(tr.mixed_precision, runtime.device)
        saved = load_for_resume(run_dir, "diffusion") if resume else None
        if saved is not None:
            scale_factor = saved["scale_factor"]
        else:
            scale_factor = compute_scale_factor(train_latents, tr.scale_factor_batches, tr.batch_size, runtime, config.seed)
        task = DiffusionTask(config, runtime, precision, autoencoder, scale_factor, affine)
        state = LoopState()
        if saved is not None:
            changed = differences(saved["unet_args"], task.unet_args)
            if changed:
                raise RunError(f"--resume: the config changes the UNet architecture ({'; '.join(changed)}); "
                               f"restore those keys or start a new run in another output_dir")
            task.load_state_dict(saved)
            state = restore_loop(saved, precision, runtime, config.seed)
            log.info("resumed %s at epoch %d, step %d", run_dir, state.epoch, state.global_step)
        del saved  # the weights now live in the task, on its device
        log.info("latent scale factor: %.4f", scale_factor)
        if runtime.is_main:
            save_config(config, run_dir / "config.yaml")
        writer = open_writer(run_dir, runtime)
        sampler = EpochShuffleSampler(len(train_latents), config.seed + runtime.rank)
        loaders = (
            make_loader(train_latents, tr.batch_size, False, 0, config.seed, sampler=sampler),
            make_loader(val_latents, tr.batch_size, False, 0, config.seed),
            sampler,
        )
        settings = LoopSettings(
            n_epochs=tr.n_epochs, max_steps=tr.max_steps, accumulation_steps=tr.gradient_accumulation_steps,
            val_interval=tr.val_interval, fast_dev_run=tr.fast_dev_run, fast_dev_run_batches=tr.fast_dev_run_batches,
            log_every_n_steps=tr.log_every_n_steps, checkpoint_every_n_steps=tr.checkpoint_every_n_steps,
            keep_last_checkpoints=tr.keep_last_checkpoints,
        )
        started = time.perf_counter()
        with precision.kernel_guard():
            state = fit(task, settings, runtime, precision, loaders, run_dir, state, writer)
        if writer is not None:
            writer.close()
        train_seconds = time.perf_counter() - started
        epochs_run = max(state.epoch, 1)
        per_epoch_encode = cache_info["encode_seconds"] * len(train_latents) / max(len(train_latents) + len(val_latents), 1)
        summary = {
            "run_dir": str(run_dir),
            "fast_dev_run": tr.fast_dev_run,
            "autoencoder": str(source),
            "latent_shape": list(autoencoder.latent_shape(tuple(config.data.image_size)[: config.autoencoder.spatial_dims])),
            "scale_factor": scale_factor,
            "unet_parameters": sum(p.numel() for p in task.unet.parameters()),
            "precision": precision.name,
            "world_size": runtime.world_size,
            "epochs": state.epoch,
            "optimizer_steps": state.global_step,
            "best_val_loss": state.best_metric,
            "final": state.history[-1] if state.history else {},
            "latent_cache": {
                "encode_seconds": round(cache_info["encode_seconds"], 2),
                "reused_from_disk": bool(cache_info["reused"]),
                "encoder_seconds_saved_estimate": round(per_epoch_encode * (epochs_run - 1), 2),
            },
            "peak_memory_GiB": round((torch.cuda.max_memory_allocated(runtime.device) if runtime.device.type == "cuda"
                                      else peak_rss_bytes()) / 2**30, 3),
            "seconds": round(train_seconds, 1),
        }
        if runtime.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
            cache = summary["latent_cache"]
            log.info("run folder:   %s", run_dir)
            log.info("latent shape: %s, scale factor %.4f, UNet parameters %s", summary["latent_shape"], scale_factor,
                     f"{summary['unet_parameters']:,}")
            log.info("latent cache: encoded once in %.1f s; re-encoding the training set every epoch would have "
                     "cost about %.1f s more", cache["encode_seconds"], cache["encoder_seconds_saved_estimate"])
            log.info("training:     %d epochs, %d optimiser steps, best val loss %.4f, %.0f s",
                     state.epoch, state.global_step, state.best_metric, train_seconds)
        return summary
    finally:
        runtime.close()
