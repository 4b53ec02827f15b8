"""Networks under MONAI Generative 0.2.3's import paths.

``AutoencoderKL`` is ours (per-level downsampling factors, 0.2.3's keys and numbers). The others are thin
subclasses of MONAI core's networks that take 0.2.3's arguments and load its checkpoints with the same
outputs (see docs/migration.md).
"""

from generative.networks.nets.autoencoderkl import AutoencoderKL, load_monai_core_state_dict
from generative.networks.nets.controlnet import ControlNet
from generative.networks.nets.diffusion_model_unet import DiffusionModelEncoder, DiffusionModelUNet
from generative.networks.nets.patchgan_discriminator import MultiScalePatchDiscriminator, PatchDiscriminator
from generative.networks.nets.spade_autoencoderkl import SPADEAutoencoderKL
from generative.networks.nets.spade_diffusion_model_unet import SPADEDiffusionModelUNet
from generative.networks.nets.spade_network import SPADENet
from generative.networks.nets.transformer import DecoderOnlyTransformer
from generative.networks.nets.vqvae import VQVAE

__all__ = [
    "AutoencoderKL",
    "ControlNet",
    "DecoderOnlyTransformer",
    "DiffusionModelEncoder",
    "DiffusionModelUNet",
    "MultiScalePatchDiscriminator",
    "PatchDiscriminator",
    "SPADEAutoencoderKL",
    "SPADEDiffusionModelUNet",
    "SPADENet",
    "VQVAE",
    "load_monai_core_state_dict",
]
