"""One resolver for the autoencoder's tile settings: every command that encodes or decodes whole volumes
(evaluation, sampling, the latent cache, validation, the memory estimator, the benchmarks) asks
:func:`resolve_tiles` instead of reading the keys itself, so they agree on the defaults.

The rules, in order: a command-line value wins; else the config: ``autoencoder.tile_size``, else
``data.patch_size`` when the autoencoder trained on patches, else whole volumes (``Config.inference_tile``);
the overlap is ``autoencoder.tile_overlap`` (default 0.5) and the buffers ``autoencoder.tile_buffers``
(default ``auto``).

What a tiled run did is said once and recorded in every summary that used tiles (:func:`tiling_record`): the
exact method equals whole-volume inference up to float rounding; a network it cannot stream (e.g.
``use_convtranspose: true``) falls back to blended tiles, which are approximate, and that fallback is warned
and written beside the tile size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from generative.inferers.tiling import TilingInferer, exact_tiling_supported
from monai_diffusion.config.rules import check_tiles
from monai_diffusion.config.schema import Config

__all__ = ["TileSettings", "resolve_tiles", "tiling_record"]

log = logging.getLogger("monai_diffusion")


@dataclass(frozen=True)
class TileSettings:
    """How whole volumes go through the autoencoder.

    Attributes:
        tile_size: image voxels per tile: one for every axis or one per axis, as given on the command line
            (from the config: one per axis); ``None`` = the whole volume at once.
        overlap: fraction of a tile shared with its neighbour (blended tiles).
        buffers: where the exact method keeps its full-size activations (``auto``, ``device``, ``cpu``,
            ``disk``; see ``generative.inferers.tiling.buffers``).
    """

    tile_size: int | list[int] | None
    overlap: float
    buffers: str

    @property
    def tiled(self) -> bool:
        return self.tile_size is not None

    def inferer(self, progress: bool = False, **kwargs: Any) -> TilingInferer | None:
        """The inferer for these settings (``None`` for whole volumes); ``kwargs`` go to ``TilingInferer``."""
        if self.tile_size is None:
            return None
        return TilingInferer(self.tile_size, self.overlap, buffers=self.buffers, progress=progress, **kwargs)

    def summary(self, model: nn.Module | None = None, what: str = "") -> dict[str, Any] | None:
        """The settings for a results file (``None`` for whole volumes); with the autoencoder ``model``, also the
        method its tiles ran with (see :func:`tiling_record`)."""
        if model is not None:
            return tiling_record(model, self.tile_size, self.overlap, what)
        return None if self.tile_size is None else {"tile_size": self.tile_size, "tile_overlap": self.overlap}


def tiling_record(model: nn.Module, tile_size: Sequence[int] | int | None, tile_overlap: float,
                  what: str) -> dict[str, Any] | None:
    """``{"tile_size", "tile_overlap", "method"}`` of the autoencoder ``model`` run by tiles (None: whole
    volumes); warns, naming ``what`` (e.g. "sampling"), when the exact method falls back to blending."""
    if tile_size is None:
        return None
    exact = exact_tiling_supported(model)
    if not exact:
        convtranspose = getattr(model, "init_args", {}).get("use_convtranspose", False)
        why = "transposed-convolution upsampling (use_convtranspose: true)" if convtranspose else "its modules"
        log.warning("%s by tiles: this autoencoder cannot be streamed exactly (%s), so its tiles are blended "
                    "(method 'blend', approximate: seams and small differences from whole-volume inference)", what,
                    why)
    tiles = list(tile_size) if isinstance(tile_size, (list, tuple)) else tile_size
    return {"tile_size": tiles, "tile_overlap": float(tile_overlap), "method": "exact" if exact else "blend",
            "fallback": None if exact else "exact method unsupported by this network; blended tiles"}


def resolve_tiles(
    config: Config,
    tile_size: int | Sequence[int] | None = None,
    tile_overlap: float | None = None,
    buffers: str | None = None,
    check: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    key: str = "--tile-size/--tile-overlap",
) -> TileSettings:
    """The tile settings for ``config``, with command-line values (``None`` = not given) taking precedence.

    Args:
        config: the run's config.
        tile_size: ``--tile-size`` (one value or one per axis).
        tile_overlap: ``--tile-overlap``.
        buffers: ``--buffers``.
        check: ``(spatial shape, total factors)``: refuse tiles that do not fit that volume's latent grid.
        key: what a refusal names.

    Raises:
        ConfigError: (with ``check``) tiles off the latent grid or an overlap outside [0, 1), naming ``key``.
    """
    if tile_size is None:
        tile = config.inference_tile
    else:
        tile = int(tile_size) if isinstance(tile_size, int) else [int(t) for t in tile_size]
    overlap = float(config.autoencoder.tile_overlap if tile_overlap is None else tile_overlap)
    settings = TileSettings(tile, overlap, config.autoencoder.tile_buffers if buffers is None else buffers)
    if check is not None:
        check_tiles(check[0], settings.tile_size, settings.overlap, check[1], key)
    return settings
