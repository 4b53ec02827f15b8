"""``JukeboxLoss`` (spectral loss) under MONAI Generative 0.2.3's path: MONAI core's class, same numbers."""

from monai.losses.spectral_loss import JukeboxLoss

__all__ = ["JukeboxLoss"]
