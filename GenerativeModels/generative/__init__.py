"""MONAI Generative, vendored and patched: AutoencoderKL with per-level ``downsample_factors``.

Everything that MONAI core already provides (diffusion UNet, discriminator, schedulers, inferers,
adversarial loss) is re-exported from MONAI core under MONAI Generative's familiar import paths.
"""

__version__ = "0.4.0"
