"""Losses under MONAI Generative 0.2.3's import paths (MONAI core's, with 0.2.3's extras)."""

from generative.losses.adversarial_loss import PatchAdversarialLoss
from generative.losses.perceptual import PerceptualLoss
from generative.losses.spectral_loss import JukeboxLoss

__all__ = ["JukeboxLoss", "PatchAdversarialLoss", "PerceptualLoss"]
