"""3D latent diffusion toolkit: config, data, training loops, sampling, memory tools and CLIs."""

from generative.version import __version__

__all__ = ["__version__"]
