"""Moved to ``generative.inferers.tiling`` (tiling is an inference strategy); this module re-exports its
public names for code that imports them from here."""

from generative.inferers.tiling import (
    exact_tiling_supported,
    tile_layout,
    tiled_decode,
    tiled_encode,
    tiled_reconstruct,
)

__all__ = ["tile_layout", "tiled_encode", "tiled_decode", "tiled_reconstruct", "exact_tiling_supported"]
