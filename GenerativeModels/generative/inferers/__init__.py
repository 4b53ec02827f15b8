"""Diffusion inferers, re-exported from MONAI core."""

from monai.inferers import DiffusionInferer, LatentDiffusionInferer

__all__ = ["DiffusionInferer", "LatentDiffusionInferer"]
