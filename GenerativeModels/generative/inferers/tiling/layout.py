# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""Where tiles go: tile size and step on the latent grid, and the exact method's block shape."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["tile_layout", "monai_overlap", "slab", "region", "MIN_DEEPEST_SIDE"]

# the thinnest block side the exact method makes, in voxels of the deepest level (thinner blocks run far
# slower than their size suggests: measured in docs/tiling.md)
MIN_DEEPEST_SIDE = 8


def tile_layout(
    spatial_shape: Sequence[int], tile_size: Sequence[int] | int, overlap: float, factors: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tile size and step between tile starts, both multiples of the total downsampling factor.

    Args:
        spatial_shape: the volume's spatial size (each a multiple of its factor).
        tile_size: voxels per tile along each axis (an int applies to every axis); each a multiple of the
            axis' total downsampling factor. Tiles larger than the volume are shrunk to it.
        overlap: fraction of a tile shared with its neighbour, in [0, 1); rounded up so that the step
            between tiles is a whole number of latent voxels.
        factors: total downsampling factor per axis.

    Returns:
        ``(tile, step)`` in image voxels.

    Raises:
        ValueError: for a tile size or overlap the network cannot use, naming the valid choices.
    """
    dims = len(factors)
    tiles = [int(tile_size)] * dims if isinstance(tile_size, int) else [int(t) for t in tile_size]
    if len(tiles) != dims:
        raise ValueError(f"tile_size = {tiles}: expected one size per spatial axis ({dims})")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"tile_overlap = {overlap}: expected a fraction in [0, 1), e.g. 0.25")
    for t, f in zip(tiles, factors):
        if t < f or t % f != 0:
            lower, upper = max(f, t // f * f), max(f, math.ceil(t / f) * f)
            choice = f"{lower} or {upper}" if upper != lower else str(lower)
            raise ValueError(
                f"tile_size = {tiles}: every tile size must be a positive multiple of the total downsampling "
                f"factor {list(factors)}; {t} is not (use {choice})"
            )
    tiles = [min(t, s) for t, s in zip(tiles, spatial_shape)]
    steps = [max(f, int(t * (1.0 - overlap)) // f * f) for t, f in zip(tiles, factors)]
    return tuple(tiles), tuple(steps)


def monai_overlap(tile: Sequence[int], step: Sequence[int]) -> list[float]:
    """MONAI's ``overlap`` argument for an exact step: it computes the step as ``int(tile * (1 - overlap))``,
    and half a voxel keeps float rounding away from the integer below."""
    return [min(max(0.0, 1.0 - (s + 0.5) / t), 0.999) for t, s in zip(tile, step)]


def slab(tile: Sequence[int], shape: Sequence[int], factors: Sequence[int]) -> list[int]:
    """The exact method's block: at most as many voxels as ``tile``, spanning whole trailing axes.

    From the last axis forwards, an axis is widened to the whole volume while the axes before it can shrink
    (evenly, to multiples of their factors) to keep the voxel count, but not below ``MIN_DEEPEST_SIDE``
    voxels of the deepest level. Blocks that span whole trailing axes are long contiguous runs of memory,
    which makes reading, normalising, padding and writing them cheap."""
    block, voxels = [min(t, n) for t, n in zip(tile, shape)], math.prod(tile)
    for axis in range(len(block) - 1, 0, -1):
        if block[axis] == shape[axis]:
            continue
        lead = block[:axis]
        ratio = (voxels / (math.prod(lead) * shape[axis] * math.prod(block[axis + 1 :]))) ** (1 / axis)
        lead = [min(int(t * ratio) // f * f, n) for t, f, n in zip(lead, factors, shape)]
        if any(t < min(MIN_DEEPEST_SIDE * f, n) for t, f, n in zip(lead, factors, shape)):
            break
        block = [*lead, shape[axis], *block[axis + 1 :]]
    return block


def region(tensor: torch.Tensor, low: Sequence[int], high: Sequence[int]) -> torch.Tensor:
    """``tensor[:, :, low:high]`` per spatial axis, as a view (``narrow``: it also works on fake CUDA tensors,
    where Python indexing needs a CUDA build)."""
    for axis, (lo, hi) in enumerate(zip(low, high), start=2):
        tensor = tensor.narrow(axis, lo, hi - lo)
    return tensor
