# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``SPADEDiffusionModelUNet`` with MONAI Generative 0.2.3's arguments, checkpoints and outputs."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import spade_diffusion_model_unet as _core

from generative._dropin import Layout023Mixin, resolve_alias
from generative.networks.nets._layout023 import DIFFUSION_RULES, skip_self_attention_projection, spade_rules

__all__ = ["SPADEDiffusionModelUNet"]


class SPADEDiffusionModelUNet(Layout023Mixin, _core.SPADEDiffusionModelUNet):
    """MONAI core's SPADE diffusion UNet (label-conditioned decoder) with 0.2.3's API, keys and numerics.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: input channels.
        out_channels: output channels.
        label_nc: channels of the semantic label map ``seg``.
        num_res_blocks: residual blocks per level.
        num_channels: output channels of each level (MONAI core's ``channels`` also works).
        attention_levels: which levels have attention.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        resblock_updown: residual blocks for up/downsampling.
        num_head_channels: channels per attention head.
        with_conditioning: cross-attention transformers instead of self-attention blocks.
        transformer_num_layers: transformer layers per attention level.
        cross_attention_dim: context size for cross-attention.
        num_class_embeds: number of classes for class conditioning.
        upcast_attention: compute attention in float32.
        use_flash_attention: use ``scaled_dot_product_attention``'s fused kernels.
        spade_intermediate_channels: hidden channels of the SPADE blocks.
        channels: MONAI core's name for ``num_channels``.

    ``forward(x, timesteps, seg, context=None, class_labels=None, ...)``: x is BxCx[SPATIAL DIMS], seg
    Bx``label_nc``x[SPATIAL DIMS]; returns Bx``out_channels``x[SPATIAL DIMS].
    """

    _layout_finders = (*DIFFUSION_RULES, spade_rules)

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        label_nc: int,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        num_channels: Sequence[int] | None = None,
        attention_levels: Sequence[bool] = (False, False, True, True),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        resblock_updown: bool = False,
        num_head_channels: int | Sequence[int] = 8,
        with_conditioning: bool = False,
        transformer_num_layers: int = 1,
        cross_attention_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        use_flash_attention: bool = False,
        spade_intermediate_channels: int = 128,
        *,
        channels: Sequence[int] | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels,
                                 (32, 64, 64, 64))
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, label_nc=label_nc,
            num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
            norm_num_groups=norm_num_groups, norm_eps=norm_eps, resblock_updown=resblock_updown,
            num_head_channels=num_head_channels, with_conditioning=with_conditioning,
            transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds, upcast_attention=upcast_attention,
            spade_intermediate_channels=spade_intermediate_channels, include_fc=True, use_combined_linear=False,
            use_flash_attention=use_flash_attention,
        )
        skip_self_attention_projection(self)
        self._use_023_layout()
