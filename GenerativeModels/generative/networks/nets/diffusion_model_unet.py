# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``DiffusionModelUNet`` and ``DiffusionModelEncoder`` with MONAI Generative 0.2.3's API, weights and numbers.

Thin subclasses of MONAI core's networks that

* take 0.2.3's ``num_channels`` (MONAI core's ``channels`` is accepted too);
* apply attention exactly as 0.2.3 does: self-attention blocks skip their output projection,
  the transformer blocks of cross-attention models apply theirs;
* save and load ``state_dict``s with 0.2.3's key names (MONAI core's keys load as well);
* unpickle whole models saved by 0.2.3 with ``torch.save(model)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from monai.networks.nets import diffusion_model_unet as _core
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding, zero_module

from generative._dropin import Layout023Mixin, LegacyPickleMixin, find_modules, legacy_class, resolve_alias
from generative.networks.nets._layout023 import DIFFUSION_RULES, skip_self_attention_projection

__all__ = ["DiffusionModelUNet", "DiffusionModelEncoder", "get_timestep_embedding", "zero_module"]

# 0.2.3's internal classes of this module; they appear in its pickles (see ``generative._dropin``)
_LEGACY_NAMES = frozenset({
    "CrossAttention", "BasicTransformerBlock", "SpatialTransformer", "AttentionBlock", "Downsample", "Upsample",
    "ResnetBlock", "DownBlock", "AttnDownBlock", "CrossAttnDownBlock", "AttnMidBlock", "CrossAttnMidBlock",
    "UpBlock", "AttnUpBlock", "CrossAttnUpBlock",
})


def __getattr__(name: str) -> type:
    return legacy_class(__name__, _LEGACY_NAMES, name)


def attention_args_from_023(old: nn.Module) -> dict[str, Any]:
    """Attention arguments of an unpickled 0.2.3 UNet-like tree (transformer depth, context size, ...)."""
    args: dict[str, Any] = {}
    transformers = find_modules(old, "SpatialTransformer")
    if transformers:
        attn2 = transformers[0].transformer_blocks[0].attn2
        args.update(transformer_num_layers=len(transformers[0].transformer_blocks),
                    cross_attention_dim=attn2.to_k.in_features, upcast_attention=attn2.upcast_attention)
    attention = find_modules(old, "AttentionBlock") + find_modules(old, "CrossAttention")
    args["use_flash_attention"] = any(getattr(m, "use_flash_attention", False) for m in attention)
    return args


class DiffusionModelUNet(LegacyPickleMixin, Layout023Mixin, _core.DiffusionModelUNet):
    """MONAI core's diffusion UNet with MONAI Generative 0.2.3's arguments, checkpoints and outputs.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: input channels.
        out_channels: output channels.
        num_res_blocks: residual blocks per level (an int applies to every level).
        num_channels: output channels of each level (0.2.3's name; MONAI core's ``channels`` also works).
        attention_levels: which levels have attention.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        resblock_updown: residual blocks for up/downsampling.
        num_head_channels: channels per attention head (an int or one per level).
        with_conditioning: cross-attention transformers instead of self-attention blocks.
        transformer_num_layers: transformer layers per attention level.
        cross_attention_dim: context size for cross-attention.
        num_class_embeds: number of classes for class conditioning.
        upcast_attention: compute attention in float32.
        use_flash_attention: use ``scaled_dot_product_attention``'s fused kernels.
        dropout_cattn: dropout of the cross-attention layers.
        channels: MONAI core's name for ``num_channels``.

    ``forward(x, timesteps, context=None, class_labels=None, down_block_additional_residuals=None,
    mid_block_additional_residual=None)``: x is BxCx[SPATIAL DIMS], timesteps B, context BxNx
    ``cross_attention_dim``, class_labels B; returns Bx``out_channels``x[SPATIAL DIMS].
    """

    _layout_finders = DIFFUSION_RULES

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
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
        dropout_cattn: float = 0.0,
        *,
        channels: Sequence[int] | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels,
                                 (32, 64, 64, 64))
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
            norm_num_groups=norm_num_groups, norm_eps=norm_eps, resblock_updown=resblock_updown,
            num_head_channels=num_head_channels, with_conditioning=with_conditioning,
            transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds, upcast_attention=upcast_attention, dropout_cattn=dropout_cattn,
            include_fc=True, use_combined_linear=False, use_flash_attention=use_flash_attention,
        )
        skip_self_attention_projection(self)
        self._use_023_layout()
        self._generative_dropin = True

    def load_old_state_dict(self, old_state_dict: dict, verbose: bool = False) -> None:
        """Load a 0.2.3 state dict. ``load_state_dict`` already does this (strictly); kept for MONAI core's API."""
        self.load_state_dict(old_state_dict, strict=True)

    @classmethod
    def _args_from_023(cls, old: nn.Module) -> dict[str, Any]:
        norm = old.out[0]
        transformers = find_modules(old, "SpatialTransformer")
        dropout = transformers[0].transformer_blocks[0].attn2.to_out[1].p if transformers else 0.0
        return dict(
            spatial_dims=old.conv_in.conv.weight.ndim - 2, in_channels=old.in_channels,
            out_channels=old.out_channels, num_res_blocks=old.num_res_blocks, num_channels=old.block_out_channels,
            attention_levels=old.attention_levels, norm_num_groups=norm.num_groups, norm_eps=norm.eps,
            resblock_updown=any(getattr(block, "resblock_updown", False) for block in old.down_blocks),
            num_head_channels=old.num_head_channels, with_conditioning=old.with_conditioning,
            num_class_embeds=old.num_class_embeds, dropout_cattn=dropout, **attention_args_from_023(old),
        )


class DiffusionModelEncoder(Layout023Mixin, _core.DiffusionModelEncoder):
    """MONAI core's diffusion-UNet encoder classifier with 0.2.3's arguments, checkpoints and outputs.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: input channels.
        out_channels: number of output classes.
        num_res_blocks: residual blocks per level.
        num_channels: output channels of each level (MONAI core's ``channels`` also works).
        attention_levels: which levels have attention.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        resblock_updown: residual blocks for downsampling.
        num_head_channels: channels per attention head.
        with_conditioning: cross-attention transformers instead of self-attention blocks.
        transformer_num_layers: transformer layers per attention level.
        cross_attention_dim: context size for cross-attention.
        num_class_embeds: number of classes for class conditioning.
        upcast_attention: compute attention in float32.
        use_flash_attention: use ``scaled_dot_product_attention``'s fused kernels.
        channels: MONAI core's name for ``num_channels``.
        input_shape: MONAI core's spatial input shape, which sizes the first classifier layer. ``None``
            (0.2.3's behaviour): that layer takes 4096 flattened features, whatever the input.

    ``forward(x, timesteps, context=None, class_labels=None)``: x is BxCx[SPATIAL DIMS]; returns
    Bx``out_channels``.
    """

    _layout_finders = DIFFUSION_RULES

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
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
        *,
        channels: Sequence[int] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels,
                                 (32, 64, 64, 64))
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            input_shape=(64, 64) if input_shape is None else input_shape,
            num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
            norm_num_groups=norm_num_groups, norm_eps=norm_eps, resblock_updown=resblock_updown,
            num_head_channels=num_head_channels, with_conditioning=with_conditioning,
            transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds, upcast_attention=upcast_attention, include_fc=True,
            use_combined_linear=False, use_flash_attention=use_flash_attention,
        )
        if input_shape is None:
            self.out[0] = nn.Linear(4096, 512)
        skip_self_attention_projection(self)
        self._use_023_layout()
