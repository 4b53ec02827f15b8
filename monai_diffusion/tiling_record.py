"""What a tiled run of the autoencoder did, said once and recorded in the summaries that used tiles.

The tiled methods (``generative.networks.tiling``): ``exact`` streams the network block by block and equals
whole-volume inference up to float rounding; a network it cannot stream (e.g. ``use_convtranspose: true``)
falls back to ``blend``, overlapping tiles with Gaussian blending, which is approximate. That fallback is
said (a warning) and written beside the tile size, so a summary never hides which method made its numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from generative.networks.tiling import exact_tiling_supported

__all__ = ["tiling_record"]

log = logging.getLogger("monai_diffusion")


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
