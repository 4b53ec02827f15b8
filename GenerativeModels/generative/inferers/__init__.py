"""Diffusion inferers under MONAI Generative 0.2.3's import path (MONAI core's classes)."""

from generative.inferers.inferer import (
    ControlNetDiffusionInferer,
    ControlNetLatentDiffusionInferer,
    DiffusionInferer,
    LatentDiffusionInferer,
    VQVAETransformerInferer,
)

__all__ = [
    "ControlNetDiffusionInferer",
    "ControlNetLatentDiffusionInferer",
    "DiffusionInferer",
    "LatentDiffusionInferer",
    "VQVAETransformerInferer",
]
