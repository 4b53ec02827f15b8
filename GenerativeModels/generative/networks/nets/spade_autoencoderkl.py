# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``SPADEAutoencoderKL`` with MONAI Generative 0.2.3's arguments, checkpoints and outputs."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks.spade_norm import SPADE
from monai.networks.nets import spade_autoencoderkl as _core

from generative._dropin import Layout023Mixin, resolve_alias
from generative.networks.nets._layout023 import self_attention_rules, skip_self_attention_projection, upsample_rules

__all__ = ["SPADEAutoencoderKL"]

# 0.2.3's SPADE residual blocks build their parameter-free GroupNorm without an eps: torch's default
_SPADE_NORM_EPS_023 = 1e-5


class SPADEAutoencoderKL(Layout023Mixin, _core.SPADEAutoencoderKL):
    """MONAI core's SPADE autoencoder (label-conditioned decoder) with 0.2.3's API, keys and numerics.

    Differences from MONAI core that this class undoes: attention blocks skip their output projection,
    and the SPADE normalisation in the decoder uses eps 1e-5 (0.2.3) instead of ``norm_eps``.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        label_nc: channels of the semantic label map ``seg``.
        in_channels: input channels.
        out_channels: output channels.
        num_res_blocks: residual blocks per level.
        num_channels: output channels of each level (MONAI core's ``channels`` also works).
        attention_levels: which levels have attention.
        latent_channels: latent channels.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        with_encoder_nonlocal_attn: attention at the bottom of the encoder.
        with_decoder_nonlocal_attn: attention at the top of the decoder.
        use_flash_attention: use ``scaled_dot_product_attention``'s fused kernels.
        spade_intermediate_channels: hidden channels of the SPADE blocks.
        channels: MONAI core's name for ``num_channels``.

    ``encode(x)`` -> (z_mu, z_sigma) for x BxCx[SPATIAL DIMS]; ``decode(z, seg)`` with seg
    Bx``label_nc``x[SPATIAL DIMS]; ``forward(x, seg)`` -> (reconstruction, z_mu, z_sigma).
    """

    _layout_finders = (self_attention_rules, upsample_rules)

    def __init__(
        self,
        spatial_dims: int,
        label_nc: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        num_channels: Sequence[int] | None = None,
        attention_levels: Sequence[bool] = (False, False, True, True),
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        spade_intermediate_channels: int = 128,
        *,
        channels: Sequence[int] | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels,
                                 (32, 64, 64, 64))
        super().__init__(
            spatial_dims=spatial_dims, label_nc=label_nc, in_channels=in_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
            latent_channels=latent_channels, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
            spade_intermediate_channels=spade_intermediate_channels, include_fc=True, use_combined_linear=False,
            use_flash_attention=use_flash_attention,
        )
        skip_self_attention_projection(self)
        for module in self.decoder.modules():
            if isinstance(module, SPADE):
                module.param_free_norm.eps = _SPADE_NORM_EPS_023
        self._use_023_layout()
