# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``TransformerBlock`` with MONAI Generative 0.2.3's signature and state-dict layout."""

from __future__ import annotations

from monai.networks.blocks import transformerblock as _core

from generative._dropin import Layout023Mixin
from generative.networks.nets._layout023 import transformer_norm_rules

__all__ = ["TransformerBlock"]


class TransformerBlock(Layout023Mixin, _core.TransformerBlock):
    """Pre-norm transformer block (attention, optional cross-attention, MLP), 0.2.3's API on MONAI core's block.

    Saves and loads 0.2.3's norm names (``norm2`` before cross-attention, ``norm3`` before the MLP); the
    attention layers have separate q/k/v projections and an output projection, as in 0.2.3.

    Args:
        hidden_size: model width.
        mlp_dim: hidden width of the MLP.
        num_heads: attention heads.
        dropout_rate: dropout rate.
        qkv_bias: bias in the q/k/v projections.
        causal: causal self-attention.
        sequence_length: maximum sequence length (needed with ``causal``).
        with_cross_attention: add cross-attention to a context.
        use_flash_attention: use ``scaled_dot_product_attention``'s fused kernels.

    ``forward(x, context=None)``: x is BxNx``hidden_size``; returns the same shape.
    """

    _layout_finders = (transformer_norm_rules,)

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        causal: bool = False,
        sequence_length: int | None = None,
        with_cross_attention: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, dropout_rate=dropout_rate,
            qkv_bias=qkv_bias, causal=causal, sequence_length=sequence_length,
            with_cross_attention=with_cross_attention, use_flash_attention=use_flash_attention,
            include_fc=True, use_combined_linear=False,
        )
        self._use_023_layout()
