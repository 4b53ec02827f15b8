"""Memory of the ControlNet stage, counted on fake tensors like the other estimates (``monai_diffusion.memory``):
its training step and sampling with it. ``memory.estimate_pipeline`` appends these phases when
``data.num_classes`` is set.

The training step holds the frozen UNet (weights only), the ControlNet (weights, gradients, Adam state, EMA),
the label maps at image size (their one-hot form is saved by the conditioning embedding), and what autograd
saves in both networks (the gradient flows through the UNet to the ControlNet's residuals). Sampling adds the
ControlNet and the one-hot maps to the UNet's denoising step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from monai_diffusion.config import Config
from monai_diffusion.config.rules import autoencoder_totals, check_controlnet_unet

__all__ = ["ControlNetEstimate", "estimate_controlnet", "controlnet_phases", "measure_controlnet_step"]


@dataclass
class ControlNetEstimate:
    """A ControlNet training step on whole-volume latents, by component (bytes)."""

    latent_shape: tuple[int, ...]
    batch_size: int
    num_classes: int
    activations: int
    backward_working_set: int
    label_maps: int  # the class indices (int64) the one-hot maps are scattered from; the one-hot maps themselves
    # are what the conditioning embedding saves (in ``activations``)
    unet_parameters: int
    parameters: int
    gradients: int
    optimizer_state: int
    ema: int

    @property
    def total(self) -> int:
        return (self.activations + self.backward_working_set + self.label_maps + self.unet_parameters
                + self.parameters + self.gradients + self.optimizer_state + self.ema)


def _networks(config: Config) -> tuple[Any, Any, tuple[int, ...]]:
    from monai.networks.nets import DiffusionModelUNet

    from monai_diffusion.generation.controlnet import build_controlnet

    check_controlnet_unet(config)  # a UNet with concatenated conditions has no ControlNet
    ae, df = config.autoencoder, config.diffusion
    totals = tuple(autoencoder_totals(config))
    unet_args = df.unet_kwargs(ae.latent_channels, ae.spatial_dims)
    unet = DiffusionModelUNet(**unet_args)
    controlnet, _ = build_controlnet(unet, unet_args, int(config.data.num_classes),
                                     config.controlnet.conditioning_channels, totals)
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    latent = (ae.latent_channels, *(s // f for s, f in zip(size, totals)))
    return unet, controlnet, latent


def estimate_controlnet(config: Config, batch_size: int | None = None, target: str = "cuda") -> ControlNetEstimate:
    """Count one ControlNet training step of ``config`` (``data.num_classes`` set) on fake tensors."""
    from monai_diffusion.generation.controlnet import ControlledUNet
    from monai_diffusion.memory.counting import _autocast, count_saved

    tr = config.controlnet.training
    batch = batch_size or tr.batch_size
    size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
    with FakeTensorMode():
        unet, controlnet, latent = _networks(config)
        unet.requires_grad_(False)
        blocks = {"controlnet": controlnet, **{f"unet.down.{i}": b for i, b in enumerate(unet.down_blocks)},
                  "unet.middle": unet.middle_block, **{f"unet.up.{i}": b for i, b in enumerate(unet.up_blocks)}}
        x = torch.empty((batch, *latent))
        label = torch.zeros((batch, 1, *size), dtype=torch.long)
        with count_saved(blocks, exclude=(unet, controlnet), fake=True) as record, _autocast(tr.mixed_precision,
                                                                                            target):
            loss = F.mse_loss(ControlledUNet(unet, controlnet, label)(x, torch.zeros((batch,), dtype=torch.long))
                              .float(), x)
        del loss
        params = sum(p.numel() for p in controlnet.parameters())
        unet_params = sum(p.numel() for p in unet.parameters())
    classes = int(config.data.num_classes)
    return ControlNetEstimate(
        latent_shape=latent, batch_size=batch, num_classes=classes, activations=record.total,
        backward_working_set=int(1.5 * 4 * record.largest_numel),
        label_maps=batch * int(torch.tensor(size).prod()) * 8, unet_parameters=4 * unet_params,
        parameters=4 * params, gradients=4 * params, optimizer_state=8 * params,
        ema=4 * params if tr.ema_decay is not None else 0,
    )


def controlnet_phases(config: Config, target: str = "cuda", autoencoder_bytes: int = 0) -> list[Any]:
    """The ControlNet's phases of the pipeline estimate: its training step and the denoising step of sampling
    from masks (``diffusion.sampling.batch_size`` masks; the autoencoder's ``autoencoder_bytes`` of weights stay on
    the device, as in the other sampling phases)."""
    from monai_diffusion.generation.controlnet import ControlledUNet
    from monai_diffusion.memory.counting import LiveBytes, PhaseEstimate, _autocast

    step = estimate_controlnet(config, target=target)
    df = config.diffusion
    samples = df.sampling.batch_size
    guided = bool(df.conditioning.categorical or df.conditioning.continuous) and df.sampling.guidance_scale != 1.0
    size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
    with FakeTensorMode():
        unet, controlnet, latent = _networks(config)
        weights = sum(p.numel() * p.element_size() for m in (unet, controlnet) for p in m.parameters())
        live = LiveBytes()
        label = torch.zeros((samples, 1, *size), dtype=torch.long)
        with torch.no_grad(), live, _autocast(df.training.mixed_precision, target):
            inputs = torch.empty((samples * (2 if guided else 1), *latent))
            out = ControlledUNet(unet.eval(), controlnet.eval(), label)(inputs, torch.zeros((len(inputs),),
                                                                                           dtype=torch.long))
            del out
    shape = "x".join(map(str, step.latent_shape))
    return [
        PhaseEstimate("ControlNet training step", f"latents {shape} x {step.batch_size}, {step.num_classes} classes "
                      f"one-hot at image size", step.total),
        PhaseEstimate("sampling with ControlNet", f"{samples} mask{'s' if samples > 1 else ''}"
                      f"{' x 2 (guidance)' if guided else ''}", autoencoder_bytes + weights + live.peak),
    ]


def measure_controlnet_step(config: Config, device: torch.device, repeats: int = 2) -> tuple[int, float]:
    """Peak bytes (above the start, plus the weights and Adam state) and median seconds of one real ControlNet
    training step of ``config`` on ``device`` (random weights), for benchmarks/gpu_suite.py."""
    from monai_diffusion.generation.controlnet import ControlledUNet
    from monai_diffusion.profiling import measure_peak_bytes

    unet, controlnet, latent = _networks(config)
    unet.to(device).requires_grad_(False)
    controlnet.to(device)
    optimizer = torch.optim.Adam(controlnet.parameters(), lr=1e-4)
    batch = config.controlnet.training.batch_size
    size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
    x = torch.randn((batch, *latent), device=device)
    label = torch.randint(0, int(config.data.num_classes), (batch, 1, *size), device=device)
    amp = config.controlnet.training.mixed_precision and device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, enabled=amp):
            out = ControlledUNet(unet, controlnet, label)(x, torch.zeros((batch,), dtype=torch.long, device=device))
        F.mse_loss(out.float(), x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # Adam's state exists from here on
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    weights = sum(p.numel() * p.element_size() for m in (unet, controlnet) for p in m.parameters())
    peak = measure_peak_bytes(step, device) + state + weights
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return peak, sorted(times)[len(times) // 2]
