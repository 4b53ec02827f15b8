"""Losses, re-exported from MONAI core (the offline 3D perceptual loss lives in ``monai_diffusion``)."""

from monai.losses import PatchAdversarialLoss

__all__ = ["PatchAdversarialLoss"]
