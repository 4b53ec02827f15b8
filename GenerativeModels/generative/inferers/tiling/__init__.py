# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""Tiling as an inferer: encode and decode volumes larger than memory (see ``docs/tiling.md``).

Modules: ``layout`` (where tiles and blocks go), ``blended`` (overlapping tiles, Gaussian blending),
``exact`` (the streamed layer-by-layer method), ``buffers`` (where its full-size activations live),
``steps`` (how a network describes itself to the streamer) and ``inferer`` (:class:`TilingInferer`, the
one way in). The functions below are that inferer in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from generative.inferers.tiling.buffers import BUFFER_KINDS, BufferRequest, choose_buffers, free_device_bytes
from generative.inferers.tiling.inferer import METHODS, TiledModel, TilingInferer, exact_tiling_supported
from generative.inferers.tiling.layout import tile_layout
from generative.inferers.tiling.steps import TilingPlan

__all__ = ["TilingInferer", "TiledModel", "TilingPlan", "BufferRequest", "BUFFER_KINDS", "METHODS", "tile_layout",
           "exact_tiling_supported", "choose_buffers", "free_device_bytes", "tiled_encode", "tiled_decode",
           "tiled_reconstruct"]


def tiled_encode(model: TiledModel, x: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5,
                 progress: bool = False, volume_statistics: bool = True, method: str = "auto",
                 buffers: str = "auto", report: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``TilingInferer(tile_size, overlap, method, buffers, progress, volume_statistics).encode(model, x, report)``."""
    return TilingInferer(tile_size, overlap, method, buffers, progress, volume_statistics).encode(model, x, report)


def tiled_decode(model: TiledModel, z: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5,
                 progress: bool = False, volume_statistics: bool = True, method: str = "auto",
                 buffers: str = "auto", report: dict[str, Any] | None = None) -> torch.Tensor:
    """``TilingInferer(...).decode(model, z, report)``; see :func:`tiled_encode`."""
    return TilingInferer(tile_size, overlap, method, buffers, progress, volume_statistics).decode(model, z, report)


def tiled_reconstruct(model: TiledModel, x: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5,
                      progress: bool = False, volume_statistics: bool = True, method: str = "auto",
                      buffers: str = "auto", report: dict[str, Any] | None = None) -> torch.Tensor:
    """``TilingInferer(...).reconstruct(model, x, report)``; see :func:`tiled_encode`."""
    return TilingInferer(tile_size, overlap, method, buffers, progress, volume_statistics).reconstruct(
        model, x, report)
