"""``SPADE`` normalisation under MONAI Generative 0.2.3's path (MONAI core's block).

MONAI core's block keeps its parameter-free norm at ``param_free_norm`` where 0.2.3 had
``param_free_norm.N``; the networks that use it (``SPADEDiffusionModelUNet``, ``SPADEAutoencoderKL``)
map those keys. A bare ``SPADE`` module saves MONAI core's keys.
"""

from monai.networks.blocks.spade_norm import SPADE

__all__ = ["SPADE"]
