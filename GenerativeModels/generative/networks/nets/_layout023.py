# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""Where MONAI core's module trees name a tensor differently from MONAI Generative 0.2.3.

Each finder looks at one sub-module (``prefix`` is its path plus a dot) and returns prefix rules
``(ours, old, distinctive)`` for ``generative._dropin.Layout023Mixin``. Also the one numerical
difference shared by the diffusion networks: 0.2.3's spatial self-attention block creates an output
projection (``proj_attn``) but never applies it, while MONAI core applies it (``include_fc=True``).
"""

from __future__ import annotations

import torch.nn as nn
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.blocks import TransformerBlock as CoreTransformerBlock
from monai.networks.blocks.spade_norm import SPADE
from monai.networks.nets.diffusion_model_unet import DiffusionUNetTransformerBlock

from generative._dropin import Rule


def self_attention_rules(prefix: str, module: nn.Module) -> list[Rule]:
    """0.2.3's ``AttentionBlock`` holds ``to_q/to_k/to_v/proj_attn`` itself; MONAI core under ``attn.``."""
    if not isinstance(module, SpatialAttentionBlock):
        return []
    rules: list[Rule] = [(f"{prefix}attn.to_{n}.", f"{prefix}to_{n}.", True) for n in "qkv"]
    return rules + [(f"{prefix}attn.out_proj.", f"{prefix}proj_attn.", True)]


def transformer_attention_rules(prefix: str, module: nn.Module) -> list[Rule]:
    """0.2.3's ``CrossAttention.to_out`` is ``Sequential(Linear, Dropout)``; MONAI core's is ``out_proj``."""
    if not isinstance(module, DiffusionUNetTransformerBlock):
        return []
    return [(f"{prefix}{a}.out_proj.", f"{prefix}{a}.to_out.0.", True) for a in ("attn1", "attn2")]


def upsample_rules(prefix: str, module: nn.Module) -> list[Rule]:
    """0.2.3's upsampling convolution is ``conv``; MONAI core's ``UpSample`` calls it ``postconv``."""
    if "postconv" not in module._modules or module._modules["postconv"] is None:
        return []
    return [(f"{prefix}postconv.", f"{prefix}conv.", True)]


def spade_rules(prefix: str, module: nn.Module) -> list[Rule]:
    """0.2.3 wraps SPADE's parameter-free norm in an ``ADN`` (``param_free_norm.N``)."""
    if not isinstance(module, SPADE):
        return []
    return [(f"{prefix}param_free_norm.", f"{prefix}param_free_norm.N.", True)]


def transformer_norm_rules(prefix: str, module: nn.Module) -> list[Rule]:
    """0.2.3's ``TransformerBlock``: ``norm2`` before cross-attention (only with it), ``norm3`` before the MLP.

    MONAI core: ``norm_cross_attn`` (always created) and ``norm2``. ``norm2`` exists in both layouts with
    different meanings, so only ``norm3`` marks a 0.2.3 dict.
    """
    if not isinstance(module, CoreTransformerBlock):
        return []
    cross = f"{prefix}norm2." if module.with_cross_attention else None
    return [(f"{prefix}norm2.", f"{prefix}norm3.", True), (f"{prefix}norm_cross_attn.", cross, False)]


DIFFUSION_RULES = (self_attention_rules, transformer_attention_rules, upsample_rules)


def skip_self_attention_projection(model: nn.Module) -> None:
    """Make every spatial self-attention block of ``model`` leave out its output projection, as 0.2.3 does.

    The projection's weights stay, trainable but unused (0.2.3 checkpoints have them); only the forward pass
    skips them.
    """
    for module in model.modules():
        if isinstance(module, SpatialAttentionBlock):
            module.attn.include_fc = False
