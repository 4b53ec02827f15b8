"""Layers: MONAI Generative 0.2.3's vector quantisers, and our activation-recompute helpers (``recompute``)."""

from generative.networks.layers.vector_quantizer import EMAQuantizer, VectorQuantizer

__all__ = ["EMAQuantizer", "VectorQuantizer"]
