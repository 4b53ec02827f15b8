"""Stage 3: a ControlNet that makes the trained, frozen diffusion UNet follow label maps.

The ControlNet (MONAI core's, see ``monai_diffusion.generation.controlnet``) starts from the UNet's weights and learns,
with the UNet's own noise-prediction loss and noise schedule, to steer it towards the volume whose label map
it is given. The latents and the label maps beside them come from the same cache as the diffusion stage's;
resume, DDP, mixed precision and EMA are the shared loop's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from monai_diffusion.config import Config
from monai_diffusion.config.schema import ControlNetTrainingConfig
from monai_diffusion.data import LABEL_KEY
from monai_diffusion.errors import CheckpointError, RunError
from monai_diffusion.generation.controlnet import ControlledUNet, build_controlnet
from monai_diffusion.generation.latents import LatentCache, cached_latents, volumes_to_encode
from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes
from monai_diffusion.pretrained.unet import unet_differences
from monai_diffusion.runs.checkpoints import DiffusionBundle, load_checkpoint, load_diffusion, resolve_checkpoint
from monai_diffusion.runtime import Precision, Runtime
from monai_diffusion.training.diffusion import DiffusionTask, latent_loaders
from monai_diffusion.training.loop import LoopState
from monai_diffusion.training.runner import Loaders, differences, run_stage
from monai_diffusion.visualize import label_preview, volume_grid

__all__ = ["ControlNetTask", "ControlNetStage", "train_controlnet"]

log = logging.getLogger("monai_diffusion")


class ControlNetTask(DiffusionTask):
    """The diffusion task with the UNet frozen and a ControlNet trained to steer it by the batch's label maps.

    Args:
        config: the resolved run config.
        runtime: device and DDP placement.
        precision: autocast / loss scaling.
        bundle: the trained diffusion model (its sampling weights become the frozen UNet).
        reference_affine: 4x4 affine of the training volumes, for NIfTI samples.
    """

    trained = "controlnet"

    def __init__(self, config: Config, runtime: Runtime, precision: Precision, bundle: DiffusionBundle,
                 reference_affine: torch.Tensor) -> None:
        # the diffusion task's UNet, scheduler and loss, on this process alone: nothing of it is trained
        super().__init__(config, Runtime(runtime.device), precision, bundle.autoencoder, bundle.scale_factor,
                         reference_affine, bundle.conditioning)
        self.runtime, self.training = runtime, config.controlnet.training
        tr = self.training
        self.unet.load_state_dict(bundle.unet.state_dict(), strict=True)
        self.unet.eval().requires_grad_(False)
        self.unet_train = self.unet
        self.controlnet, self.controlnet_spec = build_controlnet(
            self.unet, self.unet_args, config.data.num_classes, config.controlnet.conditioning_channels,
            tuple(bundle.autoencoder.total_factors))
        self.controlnet.to(runtime.device)
        self.controlnet_train: nn.Module = self.controlnet
        if runtime.distributed:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.controlnet_train = nn.parallel.DistributedDataParallel(self.controlnet, device_ids=ids)
        self.ema = None
        if tr.ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.controlnet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tr.ema_decay)
            )
        self._optimizers = {"controlnet": torch.optim.Adam(self.controlnet.parameters(), lr=tr.learning_rate)}

    # -- what the loop needs -------------------------------------------------------------------------
    def ddp_modules(self) -> list[nn.Module]:
        return [self.controlnet_train]

    def train(self, mode: bool = True) -> None:
        # only the ControlNet trains. The frozen UNet and the EMA copy stay in eval mode, also after a preview: its
        # sampler restores the mode it found on the ControlledUNet, which is the sampling ControlNet's (an EMA copy
        # left in training mode switched the frozen UNet to training mode after the first validation, so a run and
        # a copy resumed after that validation ran the UNet in different modes)
        self.controlnet.train(mode)
        self.unet.eval()
        if self.ema is not None:
            self.ema.module.eval()

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.controlnet)

    def sampling_controlnet(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.controlnet

    def sampling_model(self) -> nn.Module:
        return self.unet

    def _model(self, batch: dict[str, Any], training: bool) -> nn.Module:
        controlnet = self.controlnet_train if training else self.sampling_controlnet()
        return ControlledUNet(self.unet, controlnet, batch[LABEL_KEY].to(self.runtime.device))

    def preview(self, batch: dict[str, Any]) -> np.ndarray:
        """Samples following the first validation label maps (with their covariates), beside the maps."""
        generator = torch.Generator().manual_seed(self.config.seed)
        count = min(max(1, self.training.num_preview_samples), len(batch[LABEL_KEY]))
        labels = batch[LABEL_KEY][:count]
        conditions = self._conditions(batch).index(slice(0, count)) if self.conditioning.active else None
        model = ControlledUNet(self.unet, self.sampling_controlnet(), labels.to(self.runtime.device),
                               self.config.controlnet.conditioning_scale)
        volumes = generate_volumes(model, self.autoencoder, SamplingRequest(self.config, self.scale_factor, count,
                                   self.training.preview_inference_steps, "ddim", generator, precision=self.precision,
                                   conditions=conditions, conditioning=self.conditioning))
        masks = label_preview(labels, self.config.data.num_classes)
        return volume_grid([("label maps", list(masks)), ("samples", list(volumes.cpu().clamp(0, 1)))],
                           spatial_dims=self.config.autoencoder.spatial_dims)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),  # the frozen UNet, the autoencoder, scale factor, conditioning, config
            "stage": "controlnet",
            "controlnet": self.controlnet.state_dict(),
            "controlnet_spec": self.controlnet_spec,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controlnet.load_state_dict(state["controlnet"], strict=True)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self._optimizers["controlnet"].load_state_dict(state["optimizers"]["controlnet"])
        for group in self._optimizers["controlnet"].param_groups:
            group["lr"] = self.training.learning_rate


def _load_frozen_diffusion(config: Config, device: torch.device) -> tuple[DiffusionBundle, Path, dict[str, Any]]:
    """The trained diffusion model the ControlNet steers, checked against the config's sections."""
    key = "controlnet.diffusion_run"
    try:
        path = resolve_checkpoint(config.diffusion_source, key)
        state = load_checkpoint(path)
        bundle = load_diffusion(path, device, key=key)
    except CheckpointError as err:
        raise RunError(f"{err}; train the diffusion model first (train_diffusion.py) or point "
                       f"controlnet.diffusion_run at its run folder") from None
    expected = {k: v for k, v in config.autoencoder.model_kwargs().items() if k != "use_checkpointing"}
    found = {k: bundle.autoencoder.init_args.get(k) for k in expected}
    ae = config.autoencoder
    unet_expected = {**config.diffusion.unet_kwargs(ae.latent_channels, ae.spatial_dims),
                     **bundle.conditioning.unet_kwargs()}
    mismatch = differences(found, expected) + unet_differences(state["unet_args"], unet_expected)
    if mismatch:
        raise RunError(f"controlnet.diffusion_run: the diffusion model in {path} does not match the config's "
                       f"autoencoder and diffusion sections ({'; '.join(mismatch)}); use the config it was trained "
                       f"with ({path.parent.parent}/config.yaml)")
    return bundle, path, state


class ControlNetStage:
    """Stage 3 for :func:`~monai_diffusion.training.runner.run_stage`."""

    name = "controlnet"

    def __init__(self) -> None:
        self.bundle: DiffusionBundle | None = None
        self.source: Path | None = None
        self.latents: LatentCache | None = None
        self.volumes: tuple[Dataset, Dataset] | None = None

    def section(self, config: Config) -> ControlNetTrainingConfig:
        return config.controlnet.training

    def check_inputs(self, config: Config, runtime: Runtime) -> None:
        self.bundle, self.source, _ = _load_frozen_diffusion(config, runtime.device)
        self.volumes = volumes_to_encode(config)

    def build(self, config: Config, runtime: Runtime, precision: Precision, run_dir: Path,
              saved: dict[str, Any] | None) -> tuple[ControlNetTask, Loaders]:
        tr = config.controlnet.training
        bundle = self.bundle
        self.latents = latents = cached_latents(config, runtime, bundle.autoencoder, self.source, run_dir,
                                                self.volumes, conditioning=bundle.conditioning,
                                                cache_on_disk=tr.cache_latents_on_disk)
        task = ControlNetTask(config, runtime, precision, bundle, latents.affine)
        return task, latent_loaders(latents, tr.batch_size, config.seed, runtime)

    def check_resume(self, saved: dict[str, Any], task: ControlNetTask, config: Config, path: Path) -> None:
        changed = differences(saved["controlnet_spec"], task.controlnet_spec)
        if changed:
            raise RunError(f"--resume: the config changes the ControlNet ({'; '.join(changed)}) compared with {path}; "
                           f"restore those keys or start a new run in another output_dir")

    def summary(self, config: Config, task: ControlNetTask, state: LoopState) -> dict[str, Any]:
        return {
            "diffusion": str(self.source),
            "num_classes": config.data.num_classes,
            "scale_factor": task.scale_factor,
            "controlnet_parameters": sum(p.numel() for p in task.controlnet.parameters()),
            "conditioning_embedding": task.controlnet_spec["controlnet_args"]["conditioning_embedding_num_channels"],
            "pool_kernel": task.controlnet_spec["pool_kernel"],
            "latent_cache": {"encode_seconds": round(self.latents.encode_seconds, 2),
                             "reused_from_disk": self.latents.reused},
        }

    def describe(self, summary: dict[str, Any]) -> list[str]:
        return [
            f"ControlNet: {summary['controlnet_parameters']:,} parameters, {summary['num_classes']} classes, "
            f"conditioning embedding {summary['conditioning_embedding']} (pooling {summary['pool_kernel']} first)",
            f"frozen diffusion model: {summary['diffusion']}",
        ]


def train_controlnet(config: Config, resume: bool = False) -> dict[str, Any]:
    """Train the ControlNet on label maps; returns the run summary (also written as JSON).

    The run folder is ``<output_dir>/controlnet`` and holds ``config.yaml``, ``checkpoints/{last,best}.pt`` (the
    ControlNet, its EMA and optimiser, and the frozen UNet and autoencoder, so a checkpoint is all
    ``sample.py --mask`` needs), ``previews/`` (label maps above their samples), ``tensorboard/`` and
    ``summary.json``.
    """
    return run_stage(ControlNetStage(), config, resume)
