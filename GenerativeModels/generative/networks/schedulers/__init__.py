"""Noise schedulers with MONAI Generative 0.2.3's numbers (thin subclasses of MONAI core's)."""

from generative.networks.schedulers.ddim import DDIMScheduler
from generative.networks.schedulers.ddpm import DDPMScheduler
from generative.networks.schedulers.pndm import PNDMScheduler
from generative.networks.schedulers.scheduler import NoiseSchedules, Scheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "NoiseSchedules", "PNDMScheduler", "Scheduler"]
