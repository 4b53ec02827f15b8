# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""PatchGAN discriminators with MONAI Generative 0.2.3's ``num_channels`` and ``initialise_weights``."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import patchgan_discriminator as _core
from monai.networks.utils import normal_init

from generative._dropin import resolve_alias

__all__ = ["MultiScalePatchDiscriminator", "PatchDiscriminator"]


class PatchDiscriminator(_core.PatchDiscriminator):
    """MONAI core's PatchGAN discriminator with 0.2.3's ``num_channels`` and ``initialise_weights``.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        num_channels: channels of the first layer, doubled per layer (MONAI core's ``channels`` also works).
        in_channels: input channels.
        out_channels: output channels.
        num_layers_d: number of downsampling layers.
        kernel_size: convolution kernel size.
        activation: activation.
        norm: normalisation.
        bias: convolution bias.
        padding: convolution padding.
        dropout: dropout rate.
        last_conv_kernel_size: kernel size of the last convolution.
        channels: MONAI core's name for ``num_channels``.

    ``forward(x)``: x is BxCx[SPATIAL DIMS]; returns the list of intermediate features, the last being the
    patch logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: int | None = None,
        in_channels: int | None = None,
        out_channels: int = 1,
        num_layers_d: int = 3,
        kernel_size: int = 4,
        activation: str | tuple = ("LEAKYRELU", {"negative_slope": 0.2}),
        norm: str | tuple = "BATCH",
        bias: bool = False,
        padding: int | Sequence[int] = 1,
        dropout: float | tuple = 0.0,
        last_conv_kernel_size: int | None = None,
        *,
        channels: int | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels)
        if in_channels is None:
            raise ValueError("PatchDiscriminator: in_channels is required (channels of the images it judges)")
        super().__init__(
            spatial_dims=spatial_dims, channels=channels, in_channels=in_channels, out_channels=out_channels,
            num_layers_d=num_layers_d, kernel_size=kernel_size, activation=activation, norm=norm, bias=bias,
            padding=padding, dropout=dropout, last_conv_kernel_size=last_conv_kernel_size,
        )

    def initialise_weights(self, m: nn.Module) -> None:
        """0.2.3's initialiser for ``self.apply``: convolution weights ~ N(0, 0.02), batch norms ~ N(1, 0.02),
        bias 0."""
        normal_init(m)


class MultiScalePatchDiscriminator(_core.MultiScalePatchDiscriminator):
    """MONAI core's multi-scale PatchGAN discriminator with 0.2.3's ``num_channels``.

    Args:
        num_d: number of discriminators (scales).
        num_layers_d: layers of the first discriminator (more for each further scale).
        spatial_dims: number of spatial dimensions (2 or 3).
        num_channels: channels of the first layer (MONAI core's ``channels`` also works).
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel size.
        activation: activation.
        norm: normalisation.
        bias: convolution bias.
        dropout: dropout rate.
        minimum_size_im: smallest input size, to check the number of layers.
        last_conv_kernel_size: kernel size of the last convolution.
        channels: MONAI core's name for ``num_channels``.

    ``forward(x)``: x is BxCx[SPATIAL DIMS]; returns (the logits of each scale, the features of each scale).
    """

    def __init__(
        self,
        num_d: int,
        num_layers_d: int,
        spatial_dims: int,
        num_channels: int | None = None,
        in_channels: int | None = None,
        out_channels: int = 1,
        kernel_size: int = 4,
        activation: str | tuple = ("LEAKYRELU", {"negative_slope": 0.2}),
        norm: str | tuple = "BATCH",
        bias: bool = False,
        dropout: float | tuple = 0.0,
        minimum_size_im: int = 256,
        last_conv_kernel_size: int = 1,
        *,
        channels: int | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels)
        if in_channels is None:
            raise ValueError("MultiScalePatchDiscriminator: in_channels is required (channels of the images)")
        super().__init__(
            num_d=num_d, num_layers_d=num_layers_d, spatial_dims=spatial_dims, channels=channels,
            in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, activation=activation,
            norm=norm, bias=bias, dropout=dropout, minimum_size_im=minimum_size_im,
            last_conv_kernel_size=last_conv_kernel_size,
        )
