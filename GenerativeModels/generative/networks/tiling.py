"""Tiled encoding and decoding with AutoencoderKL, for volumes larger than memory.

The volume is cut into overlapping tiles with MONAI's ``sliding_window_inference``; every tile runs
through the network on its own and the outputs are blended with a Gaussian importance map, so seams get
little weight. Only one tile's activations exist at a time; the full-size input, output and blending
weights are the memory that grows with the volume.

Tiles are placed on the latent grid: tile sizes and the distance between tile starts are multiples of
the network's total downsampling factor, so a tile's latent lands exactly on latent voxels.

GroupNorm is what makes naive tiling inaccurate: each tile would be normalised with its own mean and
variance, which differ from the whole volume's (a tile of background is not a tile of body). By default
we therefore first measure whole-volume statistics of every GroupNorm layer, tile by tile: for the k-th
layer (in forward order) the network runs on the tiles of the blended pass, with the layers before k
already using their whole-volume statistics, up to layer k, whose per-group sums are accumulated over
the part of each tile that is nearer its centre than any other tile's (so every voxel counts once, and
the zero padding at tile borders stays out). The blended pass then uses these statistics everywhere.
This costs one partial forward over all tiles per GroupNorm layer (several times the blended pass
itself), and it is still an approximation: a convolution near a tile border sees zero padding instead
of the neighbouring voxels, and attention attends within the tile. Tiles much larger than the
network's receptive field and an overlap of 0.5 keep both effects small; ``benchmarks/tiling.py``
measures the agreement with whole-volume inference.

A tiled reconstruction encodes the whole volume tile by tile (the latent is small enough to keep) and
then decodes that latent tile by tile.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import product
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from tqdm import tqdm

if TYPE_CHECKING:
    from generative.networks.nets.autoencoderkl import AutoencoderKL

__all__ = ["tile_layout", "tiled_encode", "tiled_decode", "tiled_reconstruct"]

# Gaussian blending (MONAI's importance map); sigma = 1/8 of the tile, MONAI's default
_BLEND = {"mode": "gaussian", "sigma_scale": 0.125}


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


def _monai_overlap(tile: Sequence[int], step: Sequence[int]) -> list[float]:
    """MONAI's ``overlap`` argument for an exact step: it computes the step as ``int(tile * (1 - overlap))``,
    and half a voxel keeps float rounding away from the integer below."""
    return [min(max(0.0, 1.0 - (s + 0.5) / t), 0.999) for t, s in zip(tile, step)]


class _StopForward(Exception):
    """Raised inside the network once the GroupNorm layer being measured has seen its tile."""


class _VolumeNormStatistics:
    """Whole-volume statistics for every GroupNorm layer of ``model``, measured tile by tile.

    Inside :meth:`applied` the GroupNorm layers normalise with these statistics instead of the tile's.
    """

    def __init__(self, model: nn.Module) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        self.frozen: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}
        self.measuring: nn.GroupNorm | None = None
        self.order: list[nn.GroupNorm] | None = None
        self._sums: list[torch.Tensor] = []

    @contextmanager
    def applied(self) -> Iterator[None]:
        for norm in self.norms:
            norm.forward = types.MethodType(self._forward, norm)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.forward

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None and norm not in self.order:
            self.order.append(norm)
        if norm is self.measuring:
            # count only the part of the tile that is nearer its centre than any other tile's
            region = tuple(slice(lo * size // t, hi * size // t)
                           for (lo, hi), size, t in zip(self._region, x.shape[2:], self._tile))
            values = x[(slice(None), slice(None), *region)].double().reshape(x.shape[0], norm.num_groups, -1)
            count = torch.full_like(values[..., 0], values.shape[-1])
            self._sums.append(torch.stack([values.sum(-1), values.pow(2).sum(-1), count]))
            raise _StopForward
        # like GroupNorm under autocast: computed in float32, returned in float32 (else in x's dtype)
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        if norm not in self.frozen:  # not measured yet (only while recording the order)
            return nn.functional.group_norm(x.float(), norm.num_groups, norm.weight.float() if norm.affine else None,
                                            norm.bias.float() if norm.affine else None, norm.eps).to(dtype)
        mean, var = self.frozen[norm]
        groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
        normalised = ((groups - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if norm.affine:
            normalised = normalised * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return normalised.to(dtype)

    def measure(
        self, x: torch.Tensor, tile: Sequence[int], step: Sequence[int], unit: Sequence[int], predictor: Callable,
        progress: bool,
    ) -> None:
        """Measure every layer's statistics over the tiles of ``x`` (batch 1).

        The tiles are those of the blended pass; each voxel is counted once, in the tile whose centre is
        nearest (boundaries rounded to multiples of ``unit``, the downsampling the activations undergo).
        """
        axes = []
        for size, t, s, u in zip(x.shape[2:], tile, step, unit):
            starts = sorted({*range(0, size - t + 1, s), size - t})
            cuts = [0, *[(a + t + b) // 2 // u * u for a, b in zip(starts, starts[1:])], size]
            axes.append([(a, (lo - a, hi - a)) for a, lo, hi in zip(starts, cuts, cuts[1:])])
        windows = list(product(*axes))
        self._tile = tuple(tile)
        with self.applied(), torch.no_grad():  # the statistics are constants, never differentiated
            self.order = []
            predictor(x[(slice(None), slice(None), *(slice(0, t) for t in tile))])  # records the forward order
            order, self.order = self.order, None
            bar = tqdm(total=len(order) * len(windows), desc="GroupNorm statistics", disable=not progress, leave=False)
            for norm in order:
                self.measuring, self._sums = norm, []
                for window in windows:
                    self._region = [region for _, region in window]
                    crop = tuple(slice(a, a + t) for (a, _), t in zip(window, tile))
                    try:
                        predictor(x[(slice(None), slice(None), *crop)])
                    except _StopForward:
                        pass
                    bar.update()
                total, squares, count = torch.stack(self._sums).sum(0)
                mean = total / count
                self.frozen[norm] = (mean.float(), (squares / count - mean.pow(2)).clamp_min(0).float())
            bar.close()
        self.measuring, self._sums = None, []


def _sliding(
    model: nn.Module,
    x: torch.Tensor,
    tile: Sequence[int],
    step: Sequence[int],
    unit: Sequence[int],
    predictor: Callable,
    progress: bool,
    volume_statistics: bool,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Sliding-window ``predictor`` over ``x``, sample by sample, with whole-volume GroupNorm statistics."""
    outputs = []
    for index in range(x.shape[0]):
        sample = x[index : index + 1]
        statistics = _VolumeNormStatistics(model)
        if volume_statistics:
            statistics.measure(sample, tile, step, unit, predictor, progress)
        with statistics.applied() if volume_statistics else nullcontext():
            outputs.append(sliding_window_inference(
                sample, roi_size=list(tile), sw_batch_size=1, predictor=predictor,
                overlap=_monai_overlap(tile, step), progress=progress, **_BLEND,
            ))
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


def tiled_encode(
    model: AutoencoderKL, x: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5, progress: bool = False,
    volume_statistics: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.encode`` tile by tile.

    Args:
        model: the autoencoder.
        x: BxCx[SPATIAL DIMS].
        tile_size: image voxels per tile (multiples of ``model.total_factors``).
        overlap: fraction of a tile shared with its neighbour.
        progress: show tqdm bars over the tiles.
        volume_statistics: normalise with the whole volume's GroupNorm statistics (measured first, see the
            module docstring); False = each tile's own (cheaper, less accurate).

    Returns:
        ``(z_mu, z_sigma)``, each Bx``latent_channels``x[SPATIAL DIMS / total factor].
    """
    model._check_input(x)
    tile, step = tile_layout(x.shape[2:], tile_size, overlap, model.total_factors)
    z_mu, z_sigma = _sliding(model, x, tile, step, model.total_factors, lambda t: model.encode(t), progress, volume_statistics)
    return z_mu, z_sigma


def tiled_decode(
    model: AutoencoderKL, z: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5, progress: bool = False,
    volume_statistics: bool = True,
) -> torch.Tensor:
    """``model.decode`` tile by tile.

    Args:
        model: the autoencoder.
        z: Bx``latent_channels``x[LATENT DIMS].
        tile_size: image voxels per output tile (multiples of ``model.total_factors``); the latent tiles
            are ``tile_size / total factor``.
        overlap: fraction of a tile shared with its neighbour.
        progress: show tqdm bars over the tiles.
        volume_statistics: normalise with the whole volume's GroupNorm statistics (measured first, see the
            module docstring); False = each tile's own (cheaper, less accurate).

    Returns:
        BxCx[LATENT DIMS * total factor].
    """
    factors = model.total_factors
    image_shape = [s * f for s, f in zip(z.shape[2:], factors)]
    tile, step = tile_layout(image_shape, tile_size, overlap, factors)
    latent_tile = [t // f for t, f in zip(tile, factors)]
    latent_step = [s // f for s, f in zip(step, factors)]
    return _sliding(model, z, latent_tile, latent_step, [1] * len(factors), lambda t: model.decode(t), progress,
                    volume_statistics)  # type: ignore[return-value]


def tiled_reconstruct(
    model: AutoencoderKL, x: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5, progress: bool = False,
    volume_statistics: bool = True,
) -> torch.Tensor:
    """``model.reconstruct`` tile by tile: the latent mean of the whole volume is encoded with
    :func:`tiled_encode` (it is ``total factor`` times smaller per axis, so it fits) and decoded with
    :func:`tiled_decode`.

    Args:
        model: the autoencoder.
        x: BxCx[SPATIAL DIMS].
        tile_size: image voxels per tile (multiples of ``model.total_factors``).
        overlap: fraction of a tile shared with its neighbour.
        progress: show tqdm bars over the tiles.
        volume_statistics: see :func:`tiled_encode`.

    Returns:
        BxCx[SPATIAL DIMS].
    """
    z_mu, _ = tiled_encode(model, x, tile_size, overlap, progress, volume_statistics)
    return tiled_decode(model, z_mu, tile_size, overlap, progress, volume_statistics)
