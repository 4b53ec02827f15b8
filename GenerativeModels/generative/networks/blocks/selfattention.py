# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``SABlock`` with MONAI Generative 0.2.3's signature and weights.

0.2.3's block attends to ``context`` when one is given (self-attention otherwise) and always applies its
output projection. That is MONAI core's ``CrossAttentionBlock``, whose layers have the same names
(``to_q``, ``to_k``, ``to_v``, ``out_proj``, and the ``causal_mask`` buffer), so this is a thin subclass.
MONAI core's own ``SABlock`` differs: no context, and optional combined/absent projections.
"""

from __future__ import annotations

from monai.networks.blocks.crossattention import CrossAttentionBlock

__all__ = ["SABlock"]


class SABlock(CrossAttentionBlock):
    """Multi-head (self- or cross-) attention, 0.2.3's ``generative.networks.blocks.SABlock``.

    Args:
        hidden_size: width of the input, the context and the output.
        num_heads: attention heads (must divide ``hidden_size``).
        dropout_rate: dropout of the attention weights and the output.
        qkv_bias: bias in the q/k/v projections.
        causal: mask future positions.
        sequence_length: maximum sequence length (needed with ``causal``).
        with_cross_attention: the block is used for cross-attention (kept for 0.2.3's API; a context is
            attended to whenever ``forward`` receives one).
        use_flash_attention: use ``scaled_dot_product_attention``'s fused kernels.

    ``forward(x, context=None)``: x is BxNx``hidden_size``, context BxMx``hidden_size``; returns BxNx
    ``hidden_size``.

    Raises:
        ValueError: for a dropout outside [0, 1], ``hidden_size`` not divisible by ``num_heads``, or
            ``causal`` without ``sequence_length`` (MONAI core's checks).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        causal: bool = False,
        sequence_length: int | None = None,
        with_cross_attention: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, num_heads=num_heads, dropout_rate=dropout_rate, qkv_bias=qkv_bias,
            causal=causal, sequence_length=sequence_length, use_flash_attention=use_flash_attention,
        )
        self.with_cross_attention = with_cross_attention
