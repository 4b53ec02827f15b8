# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``DecoderOnlyTransformer`` with MONAI Generative 0.2.3's checkpoints (a thin MONAI core subclass)."""

from __future__ import annotations

from monai.networks.nets import transformer as _core

from generative._dropin import Layout023Mixin
from generative.networks.nets._layout023 import transformer_norm_rules

__all__ = ["DecoderOnlyTransformer"]


class DecoderOnlyTransformer(Layout023Mixin, _core.DecoderOnlyTransformer):
    """MONAI core's autoregressive transformer, saving and loading 0.2.3's state-dict layout.

    0.2.3 names the norm before cross-attention ``norm2`` and the one before the MLP ``norm3``; MONAI core
    calls them ``norm_cross_attn`` and ``norm2`` (and always creates ``norm_cross_attn``). The keys are
    mapped by meaning, so a 0.2.3 checkpoint loads strictly and gives 0.2.3's outputs.

    Args:
        num_tokens: vocabulary size.
        max_seq_len: maximum sequence length.
        attn_layers_dim: model width.
        attn_layers_depth: number of transformer blocks.
        attn_layers_heads: attention heads.
        with_cross_attention: cross-attention to a context in every block.
        embedding_dropout_rate: dropout after the embeddings.
        use_flash_attention: use ``scaled_dot_product_attention``'s fused kernels.

    ``forward(x, context=None)``: x is BxN token indices, context BxMx``attn_layers_dim``; returns
    BxNx``num_tokens`` logits.
    """

    _layout_finders = (transformer_norm_rules,)

    def __init__(
        self,
        num_tokens: int,
        max_seq_len: int,
        attn_layers_dim: int,
        attn_layers_depth: int,
        attn_layers_heads: int,
        with_cross_attention: bool = False,
        embedding_dropout_rate: float = 0.0,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__(
            num_tokens=num_tokens, max_seq_len=max_seq_len, attn_layers_dim=attn_layers_dim,
            attn_layers_depth=attn_layers_depth, attn_layers_heads=attn_layers_heads,
            with_cross_attention=with_cross_attention, embedding_dropout_rate=embedding_dropout_rate,
            include_fc=True, use_combined_linear=False, use_flash_attention=use_flash_attention,
        )
        self._use_023_layout()

    def load_old_state_dict(self, old_state_dict: dict, verbose: bool = False) -> None:
        """Load a 0.2.3 state dict. ``load_state_dict`` already does this (strictly); kept for MONAI core's API."""
        self.load_state_dict(old_state_dict, strict=True)
