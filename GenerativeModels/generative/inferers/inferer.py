# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""The diffusion inferers of MONAI Generative 0.2.3, from MONAI core.

MONAI core's inferers run the same loops as 0.2.3's (and add classifier-free guidance, ``cfg``); their
numbers depend on the scheduler they are given, so with ``generative.networks.schedulers`` they give
0.2.3's samples, intermediates and likelihoods.
"""

from monai.inferers.inferer import (
    ControlNetDiffusionInferer,
    ControlNetLatentDiffusionInferer,
    DiffusionInferer,
    LatentDiffusionInferer,
    VQVAETransformerInferer,
)

__all__ = [
    "ControlNetDiffusionInferer",
    "ControlNetLatentDiffusionInferer",
    "DiffusionInferer",
    "LatentDiffusionInferer",
    "VQVAETransformerInferer",
]
