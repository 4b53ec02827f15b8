"""Networks, layers and schedulers under MONAI Generative's import paths."""
