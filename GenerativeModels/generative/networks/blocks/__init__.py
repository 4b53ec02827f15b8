"""Blocks of MONAI Generative 0.2.3 with its signatures (thin subclasses of MONAI core's, or ours)."""

from generative.networks.blocks.encoder_modules import SpatialRescaler
from generative.networks.blocks.selfattention import SABlock
from generative.networks.blocks.transformerblock import TransformerBlock

__all__ = ["SABlock", "SpatialRescaler", "TransformerBlock"]
