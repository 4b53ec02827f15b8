"""Networks. ``AutoencoderKL`` is ours (per-level downsampling factors); the others come from MONAI core."""

from monai.networks.nets import DiffusionModelUNet, PatchDiscriminator

from generative.networks.nets.autoencoderkl import AutoencoderKL, load_monai_core_state_dict

__all__ = ["AutoencoderKL", "DiffusionModelUNet", "PatchDiscriminator", "load_monai_core_state_dict"]
