# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``PatchAdversarialLoss`` with MONAI Generative 0.2.3's public ``forward_single``."""

from __future__ import annotations

import torch
from monai.losses import adversarial_loss as _core
from monai.losses.adversarial_loss import AdversarialCriterions

__all__ = ["PatchAdversarialLoss", "AdversarialCriterions"]


class PatchAdversarialLoss(_core.PatchAdversarialLoss):
    """MONAI core's patch adversarial loss (least squares, BCE or hinge) plus 0.2.3's ``forward_single``.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the discriminators' outputs.
        criterion: ``"least_squares"``, ``"bce"`` or ``"hinge"``.
        no_activation_leastsq: skip the sigmoid before the least-squares loss.
    """

    def forward_single(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one discriminator output ``input`` (BxCx[SPATIAL DIMS]) against ``target`` (same shape)."""
        return self._forward_single(input, target)
