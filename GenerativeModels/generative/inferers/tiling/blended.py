# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""The blended method: overlapping tiles through the network, blended with a Gaussian importance map.

Every tile runs through the network on its own (MONAI's ``sliding_window_inference``). GroupNorm is what
makes naive tiling inaccurate: with ``volume_statistics=True`` the whole-volume statistics of every
GroupNorm layer are first measured tile by tile (:class:`VolumeNormStatistics`) and then used in every tile.
Convolutions near a tile border still see zero padding instead of the neighbouring voxels, and attention
attends within the tile: an approximation, differentiable. See ``docs/tiling.md``.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import product

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from tqdm import tqdm

from generative.inferers.tiling.layout import monai_overlap

__all__ = ["VolumeNormStatistics", "sliding"]

# Gaussian blending (MONAI's importance map); sigma = 1/8 of the tile, MONAI's default
BLEND = {"mode": "gaussian", "sigma_scale": 0.125}


class _StopForward(Exception):
    """Raised inside the network once the GroupNorm layer being measured has seen its tile."""


class VolumeNormStatistics:
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


def sliding(
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
        statistics = VolumeNormStatistics(model)
        if volume_statistics:
            statistics.measure(sample, tile, step, unit, predictor, progress)
        with statistics.applied() if volume_statistics else nullcontext():
            outputs.append(sliding_window_inference(
                sample, roi_size=list(tile), sw_batch_size=1, predictor=predictor,
                overlap=monai_overlap(tile, step), progress=progress, **BLEND,
            ))
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)
