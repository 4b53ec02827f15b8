"""Measuring a real autoencoder training step (peak memory and time), to check the estimator against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monai_diffusion.config import Config
from monai_diffusion.config.geometry import training_size
from monai_diffusion.memory.estimates import training_batch
from monai_diffusion.profiling import measure_peak_bytes, time_call
from monai_diffusion.runtime import Precision, Runtime
from monai_diffusion.training.autoencoder import AutoencoderTask
from monai_diffusion.training.loop import Optimization

__all__ = ["StepMeasurement", "measure_training_step"]


@dataclass(frozen=True)
class StepMeasurement:
    """A real autoencoder training step: peak bytes (weights, gradients and Adam state included) and
    median seconds."""

    peak_bytes: int
    seconds: float


def measure_training_step(config: Config, device: torch.device | str = "cpu", repeats: int = 3) -> StepMeasurement:
    """Run and measure the training step of ``config`` (AutoencoderTask: generator and, after the warm-up,
    discriminator losses, Adam) on one batch of random volumes (patches, when the config trains on
    patches), with the config's precision and checkpointing.

    The peak is ``profiling.measure_peak_bytes`` of one step after a first step created Adam's state,
    plus the parameters and optimiser state that exist before it.
    """
    device = torch.device(device)
    tr = config.autoencoder.training
    precision = Precision(tr.mixed_precision, device)
    torch.manual_seed(config.seed)
    task = AutoencoderTask(config, Runtime(device), precision)
    optimization = Optimization(task.optimizers(), precision, 1)
    batch = {"image": torch.rand(training_batch(config), config.autoencoder.in_channels, *training_size(config))}

    def step() -> None:
        task.training_step(batch, epoch=tr.adversarial_warmup_epochs, optimization=optimization)
        optimization.step()

    with precision.kernel_guard():
        step()  # creates Adam's state, which then exists before the measured step
        modules = [m for m in (task.autoencoder, task.discriminator) if m is not None]
        existing = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        existing += sum(t.numel() * t.element_size() for opt in task.optimizers().values()
                        for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
        peak = measure_peak_bytes(step, device) + existing
        seconds = time_call(step, repeats=repeats, warmup=0, device=device)
    return StepMeasurement(peak, seconds)
