"""Training: the loop (``loop``), the autoencoder step (``autoencoder``), checkpoints, runtime, previews."""

from monai_diffusion.training.autoencoder import AutoencoderTask, train_autoencoder
from monai_diffusion.training.checkpoint import load_autoencoder

__all__ = ["AutoencoderTask", "train_autoencoder", "load_autoencoder"]
