"""Diffusion batch preparation for MONAI engines under MONAI Generative 0.2.3's path (MONAI core's classes)."""

from monai.engines.utils import DiffusionPrepareBatch, VPredictionPrepareBatch

__all__ = ["DiffusionPrepareBatch", "VPredictionPrepareBatch"]
