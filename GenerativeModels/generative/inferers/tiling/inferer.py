# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""Tiled encoding and decoding of an autoencoder, for volumes larger than memory: the one way in.

:class:`TilingInferer` holds the settings (tile size, overlap, method, buffers) and runs a model's
``encode``/``decode``/``reconstruct`` tile by tile. ``AutoencoderKL.encode(x, tile_size=...)`` builds one;
so do evaluation, sampling and the memory estimator.

The model needs ``total_factors`` (total downsampling per axis), ``encode``/``decode`` (the blended method
runs them on tiles) and, for the exact method,
``tiling_plan()`` returning a :class:`~generative.inferers.tiling.steps.TilingPlan` (``None`` where it
cannot be streamed); a ``latent_shape(spatial)`` that validates an input's shape is used where present.
The inferer imports no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn as nn

from generative.inferers.tiling.blended import sliding
from generative.inferers.tiling.buffers import BUFFER_KINDS, Allocator, BufferStore, buffer_dtype, choose_buffers
from generative.inferers.tiling.exact import buffer_peak, exact_decode, exact_encode
from generative.inferers.tiling.layout import slab, tile_layout
from generative.inferers.tiling.steps import TilingPlan

__all__ = ["TilingInferer", "TiledModel", "exact_tiling_supported", "METHODS"]

METHODS = ("auto", "exact", "blend")


class TiledModel(Protocol):
    """What the inferer needs of a model (``AutoencoderKL`` has it)."""

    total_factors: tuple[int, ...]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


def _plan(model: nn.Module) -> TilingPlan | None:
    describe = getattr(model, "tiling_plan", None)
    return describe() if callable(describe) else None


def exact_tiling_supported(model: nn.Module) -> bool:
    """Whether the exact (streamed) method can run ``model``: it describes itself with a tiling plan
    (``AutoencoderKL`` does unless it upsamples with transposed convolutions)."""
    return _plan(model) is not None


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count * dtype.itemsize


class TilingInferer:
    """Encode, decode or reconstruct tile by tile.

    Args:
        tile_size: image voxels per tile (an int applies to every axis; multiples of the model's total
            downsampling factor).
        overlap: fraction of a tile shared with its neighbour (blended method only; the exact method's
            blocks do not overlap).
        method: ``"exact"`` (streamed layer by layer, equal to whole-volume inference up to float rounding,
            no autograd), ``"blend"`` (overlapping tiles with Gaussian blending, differentiable) or
            ``"auto"`` (exact wherever the model allows it); see ``docs/tiling.md``.
        buffers: where the exact method keeps full-size activations: ``"auto"`` (default), ``"device"``,
            ``"cpu"`` or ``"disk"``; see ``generative.inferers.tiling.buffers``.
        progress: show a tqdm bar over the blocks (tiles).
        volume_statistics: normalise with the whole volume's GroupNorm statistics; False = each tile's own
            (blended only: cheaper, less accurate).
        allocator: wraps every buffer allocation (see ``buffers.BufferRequest``), e.g. to count it.

    Raises:
        ValueError: for a method, buffer kind or statistics choice that cannot be used, naming the fix.
    """

    def __init__(self, tile_size: Sequence[int] | int, overlap: float = 0.5, method: str = "auto",
                 buffers: str = "auto", progress: bool = False, volume_statistics: bool = True,
                 allocator: Allocator | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method = {method!r}: expected one of {', '.join(map(repr, METHODS))}")
        if buffers not in BUFFER_KINDS:
            raise ValueError(f"buffers = {buffers!r}: expected one of {', '.join(map(repr, BUFFER_KINDS))}")
        if method == "exact" and not volume_statistics:
            raise ValueError("method = 'exact' normalises with whole-volume statistics: drop volume_statistics=False "
                             "or use method='blend'")
        self.tile_size, self.overlap, self.method, self.buffers = tile_size, overlap, method, buffers
        self.progress, self.volume_statistics, self.allocator = progress, volume_statistics, allocator

    # -- helpers ------------------------------------------------------------------------------------
    def _exact_plan(self, model: nn.Module) -> TilingPlan | None:
        """The plan when the exact method runs, ``None`` when blending."""
        plan = _plan(model) if self.volume_statistics and self.method != "blend" else None
        if self.method == "exact" and plan is None:
            raise ValueError("method = 'exact': this network cannot be streamed (transposed-convolution upsampling "
                             "or modules other than AutoencoderKL's blocks); use method='blend'")
        return plan

    def _store(self, kind: str, device: torch.device):  # noqa: ANN202
        return lambda: BufferStore(kind, device, self.allocator)

    def _choose(self, steps: Sequence, source: torch.Tensor, out_bytes: int, last_into_output: bool) -> str:
        """The buffer kind (or ``"whole"``) for ``source`` (a batch) through ``steps``."""
        itemsize = buffer_dtype(source.dtype, source.device).itemsize
        peak = buffer_peak(steps, source.shape[1], source.shape[2:], itemsize, last_into_output)
        io_bytes = _nbytes(source.shape, source.dtype) + out_bytes
        return choose_buffers(self.buffers, source.device, peak, io_bytes, batch=source.shape[0])

    @staticmethod
    def _report(report: dict | None, method: str, buffer_bytes: int, block: Sequence[int] | None = None,
                buffers: str | None = None) -> None:
        if report is not None:
            report["method"] = method
            report["buffer_peak_bytes"] = max(report.get("buffer_peak_bytes", 0), buffer_bytes)
            if block is not None:
                report["block"] = tuple(block)
            if buffers is not None:
                report["buffers"] = buffers

    # -- the three calls ----------------------------------------------------------------------------
    def encode(self, model: TiledModel, x: torch.Tensor, report: dict[str, Any] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.encode`` tile by tile.

        Args:
            model: the autoencoder.
            x: BxCx[SPATIAL DIMS].
            report: if given, receives ``"method"`` (``"exact"``, ``"blend"`` or ``"whole"``: the one that ran),
                ``"buffer_peak_bytes"`` (the most bytes the exact method's buffers held at once; 0 otherwise)
                and, for the exact method, ``"block"`` (in image voxels) and ``"buffers"`` (the kind used).

        Returns:
            ``(z_mu, z_sigma)``, each Bx``latent_channels``x[SPATIAL DIMS / total factor].
        """
        validate = getattr(model, "latent_shape", None)  # AutoencoderKL's names the axis and the valid sizes
        if callable(validate):
            validate(x.shape[2:])
        tile, step = tile_layout(x.shape[2:], self.tile_size, self.overlap, model.total_factors)
        plan = self._exact_plan(model)
        if plan is None:
            self._report(report, "blend", 0)
            z_mu, z_sigma = sliding(model, x, tile, step, model.total_factors, lambda t: model.encode(t),
                                    self.progress, self.volume_statistics)
            return z_mu, z_sigma
        latent = (plan.latent_channels, *(n // f for n, f in zip(x.shape[2:], plan.factors)))
        out_bytes = 2 * _nbytes((x.shape[0], *latent), x.dtype)
        kind = self._choose(plan.encoder, x, out_bytes, last_into_output=False)
        if kind == "whole":
            self._report(report, "whole", 0, buffers=kind)
            with torch.no_grad():
                return model.encode(x)
        block = slab(tile, x.shape[2:], model.total_factors)
        (z_mu, z_sigma), peak = exact_encode(plan, x, latent, block, self._store(kind, x.device), self.progress)
        self._report(report, "exact", peak, block, kind)
        return z_mu, z_sigma

    def decode(self, model: TiledModel, z: torch.Tensor, report: dict[str, Any] | None = None) -> torch.Tensor:
        """``model.decode`` tile by tile; ``tile_size`` counts output (image) voxels.

        Args:
            model: the autoencoder.
            z: Bx``latent_channels``x[LATENT DIMS].
            report: see :meth:`encode`.

        Returns:
            BxCx[LATENT DIMS * total factor].
        """
        factors = model.total_factors
        image_shape = [s * f for s, f in zip(z.shape[2:], factors)]
        tile, step = tile_layout(image_shape, self.tile_size, self.overlap, factors)
        plan = self._exact_plan(model)
        if plan is None:
            self._report(report, "blend", 0)
            latent_tile = [t // f for t, f in zip(tile, factors)]
            latent_step = [s // f for s, f in zip(step, factors)]
            return sliding(model, z, latent_tile, latent_step, [1] * len(factors),  # type: ignore[return-value]
                           lambda t: model.decode(t), self.progress, self.volume_statistics)
        out_channels = plan.decoder[-1].out_channels(0)
        out_bytes = _nbytes((z.shape[0], out_channels, *image_shape), z.dtype)
        kind = self._choose(plan.decoder, z, out_bytes, last_into_output=True)
        if kind == "whole":
            self._report(report, "whole", 0, buffers=kind)
            with torch.no_grad():
                return model.decode(z)
        block = slab(tile, image_shape, factors)
        result, peak = exact_decode(plan, z, out_channels, block, self._store(kind, z.device), self.progress)
        self._report(report, "exact", peak, block, kind)
        return result

    def reconstruct(self, model: TiledModel, x: torch.Tensor, report: dict[str, Any] | None = None) -> torch.Tensor:
        """Encode the latent mean of the whole volume tile by tile (it is ``total factor`` times smaller per
        axis, so it fits), then decode it tile by tile; ``report``: see :meth:`encode` (the buffer peak is
        that of the larger pass)."""
        z_mu, _ = self.encode(model, x, report)
        return self.decode(model, z_mu, report)
