"""Noise schedulers, re-exported from MONAI core."""

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler"]
