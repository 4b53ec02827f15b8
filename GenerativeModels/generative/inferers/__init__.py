"""Diffusion inferers under MONAI Generative 0.2.3's import path (MONAI core's classes), and our tiled
autoencoder inference (``generative.inferers.tiling``)."""

from generative.inferers.inferer import (
    ControlNetDiffusionInferer,
    ControlNetLatentDiffusionInferer,
    DiffusionInferer,
    LatentDiffusionInferer,
    VQVAETransformerInferer,
)
from generative.inferers.tiling import TilingInferer

__all__ = [
    "ControlNetDiffusionInferer",
    "ControlNetLatentDiffusionInferer",
    "DiffusionInferer",
    "LatentDiffusionInferer",
    "VQVAETransformerInferer",
    "TilingInferer",
]
