"""Engines under MONAI Generative 0.2.3's import paths (MONAI core's; the trainer needs pytorch-ignite)."""

from generative.engines.prepare_batch import DiffusionPrepareBatch, VPredictionPrepareBatch
from generative.engines.trainer import AdversarialTrainer

__all__ = ["AdversarialTrainer", "DiffusionPrepareBatch", "VPredictionPrepareBatch"]
