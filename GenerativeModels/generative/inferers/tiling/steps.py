# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""How a network's blocks describe themselves to the exact streamer.

The streamer knows no network class: a network that can be streamed hands it a :class:`TilingPlan`, a list
of steps per half (encoder, decoder), each step one of the kinds below. ``AutoencoderKL.tiling_plan()``
builds it from its blocks' ``tiling_step()``; a block that cannot be streamed (a transposed-convolution
upsampling) returns ``None`` and the network then has no plan (the blended method runs instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn

__all__ = ["ConvStep", "ResidualStep", "DownsampleStep", "UpsampleStep", "GlobalStep", "Step", "TilingPlan",
           "plain_conv"]


def plain_conv(module: nn.Module) -> nn.Module | None:
    """The zero-padded, non-transposed ``nn.ConvNd`` inside MONAI's ``Convolution(conv_only=True)`` (or the
    module itself if it is one); ``None`` for anything else."""
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    children = list(module.children())
    conv = module if isinstance(module, conv_types) else (children[0] if len(children) == 1 else None)
    if isinstance(conv, conv_types) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return conv
    return None


@dataclass
class ConvStep:
    """``finish(conv(silu?(norm(x))))``; ``norm`` (optional) with the input's whole-volume statistics."""

    conv: nn.Module  # an nn.ConvNd (see plain_conv)
    norm: nn.GroupNorm | None = None
    silu: bool = False
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def normalises(self) -> bool:
        return self.norm is not None

    def out_channels(self, channels: int) -> int:
        return self.conv.out_channels

    def out_shape(self, shape: Sequence[int]) -> list[int]:
        c = self.conv
        return [(n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, p, d, k, s in zip(shape, c.padding, c.dilation, c.kernel_size, c.stride)]


@dataclass
class ResidualStep:
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; ``shortcut`` None = identity."""

    norm1: nn.GroupNorm
    conv1: nn.Module
    norm2: nn.GroupNorm
    conv2: nn.Module
    shortcut: nn.Module | None = None
    normalises: bool = True

    def out_channels(self, channels: int) -> int:
        return self.conv2.out_channels

    def out_shape(self, shape: Sequence[int]) -> list[int]:
        return list(shape)


@dataclass
class DownsampleStep:
    """``conv(right-pad-by-one(x))`` with ``stride``: the zeros beyond the volume are the padding."""

    conv: nn.Module
    stride: Sequence[int]
    normalises: bool = False

    def out_channels(self, channels: int) -> int:
        return self.conv.out_channels

    def out_shape(self, shape: Sequence[int]) -> list[int]:
        return [n // s for n, s in zip(shape, self.stride)]


@dataclass
class UpsampleStep:
    """``conv(interpolate(x))``, ``interpolate`` enlarging each axis by its integer ``scale``; ``mode``:
    ``"nearest"`` (voxel ``i`` is source voxel ``i // scale``) or ``"trilinear"`` (linear along every axis,
    ``align_corners=False``)."""

    conv: nn.Module
    scale: Sequence[int]
    mode: str
    interpolate: Callable[[torch.Tensor], torch.Tensor]
    normalises: bool = False

    def out_channels(self, channels: int) -> int:
        return self.conv.out_channels

    def out_shape(self, shape: Sequence[int]) -> list[int]:
        return [n * s for n, s in zip(shape, self.scale)]


@dataclass
class GlobalStep:
    """A module that needs its whole input at once (attention): run on the whole activation, shape kept."""

    module: nn.Module
    normalises: bool = True

    def out_channels(self, channels: int) -> int:
        return channels

    def out_shape(self, shape: Sequence[int]) -> list[int]:
        return list(shape)


Step = Union[ConvStep, ResidualStep, DownsampleStep, UpsampleStep, GlobalStep]


@dataclass
class TilingPlan:
    """A streamable autoencoder.

    Attributes:
        encoder: image -> the encoder's last activation.
        heads: convolutions that each read the encoder's last activation into one output (z_mu, z_sigma).
        decoder: latent -> image.
        factors: total downsampling factor per axis.
        latent_channels: channels of the latent.
    """

    encoder: list[Step]
    heads: list[ConvStep]
    decoder: list[Step]
    factors: tuple[int, ...]
    latent_channels: int
