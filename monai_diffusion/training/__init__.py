"""Training: the loop once (``loop``), one stage runner (``runner``), and the two stages: the autoencoder
(``autoencoder``) and latent diffusion (``diffusion``)."""

from monai_diffusion.runs.checkpoints import load_autoencoder  # its 0.4 import path, used in notebooks
from monai_diffusion.training.autoencoder import AutoencoderTask, train_autoencoder
from monai_diffusion.training.diffusion import DiffusionTask, train_diffusion

__all__ = ["AutoencoderTask", "DiffusionTask", "train_autoencoder", "train_diffusion", "load_autoencoder"]
