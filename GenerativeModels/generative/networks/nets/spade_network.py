# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``SPADENet`` with MONAI Generative 0.2.3's ``num_channels`` (MONAI core's network, same weights and numbers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import spade_network as _core

from generative._dropin import resolve_alias

__all__ = ["SPADENet"]


def _check_shapes(spatial_dims: int, input_shape: Sequence[int], channels: Sequence[int]) -> None:
    """ValueError (as 0.2.3 raises) for arguments the network cannot be built from: the latent's reshape
    needs one ``input_shape`` entry per spatial dimension, each divisible by 2 ** (number of levels)."""
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not all(
            isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"num_channels = {channels!r}: expected a sequence of channel counts, e.g. [16, 32, 64, 128]")
    if not isinstance(input_shape, Sequence) or len(input_shape) != spatial_dims:
        raise ValueError(f"input_shape = {input_shape!r}: expected {spatial_dims} sizes, one per spatial dimension "
                         f"(spatial_dims = {spatial_dims})")
    factor = 2 ** len(channels)
    uneven = [size for size in input_shape if size % factor]
    if uneven:
        raise ValueError(f"input_shape = {list(input_shape)}: every size must be divisible by 2 ** len(num_channels) "
                         f"= {factor} (not {uneven})")


class SPADENet(_core.SPADENet):
    """MONAI core's SPADE network (VAE/GAN image synthesis from label maps) with 0.2.3's ``num_channels``.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: image channels.
        out_channels: output channels.
        label_nc: channels of the semantic label map.
        input_shape: spatial shape of the images.
        num_channels: channels of each encoder level (MONAI core's ``channels`` also works).
        z_dim: latent size.
        is_vae: encode images into the latent (VAE) instead of sampling it (GAN).
        spade_intermediate_channels: hidden channels of the SPADE blocks.
        norm: normalisation of the encoder.
        act: activation.
        last_act: activation of the last layer.
        kernel_size: convolution kernel size.
        upsampling_mode: upsampling interpolation mode.
        channels: MONAI core's name for ``num_channels``.

    ``forward(seg, x=None)``: seg Bx``label_nc``x[SPATIAL DIMS], x BxCx[SPATIAL DIMS]; returns, as 0.2.3
    does, ``(image, kld_loss)`` with ``is_vae`` (the KL divergence of the latent, summed) and ``(image,)``
    without. MONAI core returns ``(image, z_mu, z_logvar)`` instead.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        label_nc: int,
        input_shape: Sequence[int],
        num_channels: Sequence[int] | None = None,
        z_dim: int | None = None,
        is_vae: bool = True,
        spade_intermediate_channels: int = 128,
        norm: str | tuple = "INSTANCE",
        act: str | tuple | None = ("LEAKYRELU", {"negative_slope": 0.2}),
        last_act: str | tuple | None = ("LEAKYRELU", {"negative_slope": 0.2}),
        kernel_size: int = 3,
        upsampling_mode: str = "nearest",
        *,
        channels: Sequence[int] | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels)
        _check_shapes(spatial_dims, input_shape, channels)
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, label_nc=label_nc,
            input_shape=input_shape, channels=list(channels), z_dim=z_dim, is_vae=is_vae,
            spade_intermediate_channels=spade_intermediate_channels, norm=norm, act=act, last_act=last_act,
            kernel_size=kernel_size, upsampling_mode=upsampling_mode,
        )

    def forward(self, seg: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Synthesise an image from ``seg`` (and the style of ``x`` with ``is_vae``); see the class docstring."""
        outputs = super().forward(seg, x)
        if not self.is_vae:
            return outputs
        image, z_mu, z_logvar = outputs
        return image, -0.5 * torch.sum(1 + z_logvar - z_mu.pow(2) - z_logvar.exp())
