# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``SpatialRescaler``: resize a conditioning map (and optionally remap its channels), as in 0.2.3.

MONAI core has no such block, so this is our implementation of 0.2.3's behaviour: an optional 1x1
convolution to ``out_channels``, then ``n_stages`` interpolations, each to ``size`` or by ``multiplier``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from generative._dropin import ArgumentError

__all__ = ["SpatialRescaler"]

_METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(nn.Module):
    """Resize BxCx[SPATIAL DIMS] maps, e.g. to bring a segmentation to a latent's size.

    Args:
        spatial_dims: number of spatial dimensions.
        n_stages: number of interpolation stages (>= 0).
        size: output spatial size (only with ``n_stages=1``).
        method: interpolation mode, one of nearest, linear, bilinear, trilinear, bicubic, area.
        multiplier: scale factor per stage (a number or one per spatial dimension).
        in_channels: input channels.
        out_channels: if given, a 1x1 convolution maps ``in_channels`` to it before resizing.
        bias: bias of that convolution.

    Raises:
        ValueError: for a negative ``n_stages``, an unknown ``method``, ``size`` with ``n_stages != 1``,
            or both ``size`` and ``multiplier``. The first two are also ``AssertionError`` s
            (:class:`generative._dropin.ArgumentError`), as 0.2.3 asserted them.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        n_stages: int = 1,
        size: Sequence[int] | int | None = None,
        method: str = "bilinear",
        multiplier: Sequence[float] | float | None = None,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise ArgumentError(f"n_stages = {n_stages}: expected an integer >= 0")
        if method not in _METHODS:
            raise ArgumentError(f"method = {method!r}: expected one of {', '.join(_METHODS)}")
        if size is not None and n_stages != 1:
            raise ValueError(f"size = {size!r} needs n_stages = 1, got n_stages = {n_stages}")
        if size is not None and multiplier is not None:
            raise ValueError("give size or multiplier, not both")
        self.n_stages, self.size, self.method, self.multiplier = n_stages, size, method, multiplier
        self.remap_output = out_channels is not None
        if out_channels is not None:
            self.channel_mapper = Convolution(spatial_dims=spatial_dims, in_channels=in_channels,
                                              out_channels=out_channels, kernel_size=1, conv_only=True, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: BxCx[SPATIAL DIMS]. Returns: Bx(``out_channels`` or C)x[resized SPATIAL DIMS]."""
        if self.remap_output:
            x = self.channel_mapper(x)
        for _ in range(self.n_stages):
            x = F.interpolate(x, size=self.size, scale_factor=self.multiplier, mode=self.method)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` (the conditioning-encoder interface)."""
        return self(x)
