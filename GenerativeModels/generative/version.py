"""Version of this fork's ``generative`` package (it follows monai-diffusion; MONAI Generative's was 0.2.3)."""

__version__ = "0.5.0"
