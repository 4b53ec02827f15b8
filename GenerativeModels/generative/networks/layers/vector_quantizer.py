"""Vector quantisers of MONAI Generative 0.2.3 (MONAI core's classes; same arguments, buffers and numbers)."""

from monai.networks.layers.vector_quantizer import EMAQuantizer, VectorQuantizer

__all__ = ["EMAQuantizer", "VectorQuantizer"]
