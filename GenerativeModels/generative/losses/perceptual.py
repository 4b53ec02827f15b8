# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``PerceptualLoss`` under MONAI Generative 0.2.3's path, with an offline-friendly error.

MONAI core's class (same arguments as 0.2.3, plus ``channel_wise``) fetches pretrained networks at
construction: LPIPS through the ``lpips`` package, MedicalNet / RadImageNet through ``torch.hub``,
ResNet-50 through torchvision. Without them (offline, packages missing) construction fails with one line
that says what to do, instead of a download traceback. Nothing here downloads in the tests.
"""

from __future__ import annotations

from monai.losses import perceptual as _core

__all__ = ["PerceptualLoss"]


class PerceptualLoss(_core.PerceptualLoss):
    """MONAI core's perceptual loss; a failure to obtain the pretrained network is one ``RuntimeError`` line.

    Args:
        spatial_dims: 2 or 3.
        network_type: ``"alex"``, ``"vgg"``, ``"squeeze"`` (LPIPS), ``"radimagenet_resnet50"``,
            ``"medicalnet_resnet10_23datasets"``, ``"medicalnet_resnet50_23datasets"`` or ``"resnet50"``.
        is_fake_3d: for 3D inputs, average a 2D network over slices of the three planes.
        fake_3d_ratio: fraction of the slices used with ``is_fake_3d``.
        cache_dir: where torch.hub keeps downloaded weights.
        pretrained: load pretrained weights.
        pretrained_path: a local weights file (``resnet50`` only).
        pretrained_state_dict_key: key of the weights in that file.
        channel_wise: MONAI core's per-channel loss (not in 0.2.3).

    ``forward(input, target)``: both BxCx[SPATIAL DIMS]; returns the scalar loss.

    Raises:
        ValueError: for bad arguments (MONAI core's messages).
        RuntimeError: when the pretrained network cannot be obtained.
    """

    def __init__(
        self,
        spatial_dims: int,
        network_type: str = "alex",
        is_fake_3d: bool = True,
        fake_3d_ratio: float = 0.5,
        cache_dir: str | None = None,
        pretrained: bool = True,
        pretrained_path: str | None = None,
        pretrained_state_dict_key: str | None = None,
        channel_wise: bool = False,
    ) -> None:
        try:
            super().__init__(
                spatial_dims=spatial_dims, network_type=network_type, is_fake_3d=is_fake_3d,
                fake_3d_ratio=fake_3d_ratio, cache_dir=cache_dir, pretrained=pretrained,
                pretrained_path=pretrained_path, pretrained_state_dict_key=pretrained_state_dict_key,
                channel_wise=channel_wise,
            )
        except (ValueError, NotImplementedError):
            raise
        except Exception as error:  # network, hub cache, missing optional package
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RuntimeError(
                f"PerceptualLoss(network_type={network_type!r}): could not obtain the pretrained network "
                f"({type(error).__name__}: {reason}); it is downloaded at first use, so run once online or put "
                f"the weights in the torch.hub cache (cache_dir)"
            ) from error
