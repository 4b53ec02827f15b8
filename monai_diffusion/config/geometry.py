"""Derived geometry of a config, in one place: total downsampling per axis, the latent's size, the size the
autoencoder trains on, valid sizes on the latent grid, and the same config with other downsampling factors
(:func:`with_factors`, used by the factor study and the budget search alike)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from generative.networks.nets.autoencoderkl import (
    nearest_valid_sizes,
    normalize_downsample_factors,
    total_downsample_factors,
)
from monai_diffusion.config.schema import Config
from monai_diffusion.errors import ConfigError

__all__ = ["autoencoder_totals", "latent_size", "training_size", "discriminator_min_size", "valid_sizes_near",
           "resize_levels", "with_factors"]


def autoencoder_totals(config: Config) -> tuple[int, ...]:
    """Total downsampling factor per axis of the config's autoencoder (ConfigError for bad factors)."""
    ae = config.autoencoder
    try:
        factors = normalize_downsample_factors(ae.downsample_factors, len(ae.num_channels), ae.spatial_dims)
    except ValueError as err:
        raise ConfigError(f"autoencoder.{err}") from None
    return total_downsample_factors(factors, ae.spatial_dims)


def latent_size(config: Config) -> list[int]:
    """Spatial size of the latent of one whole volume of ``data.image_size``."""
    size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
    return [s // f for s, f in zip(size, autoencoder_totals(config))]


def training_size(config: Config) -> tuple[int, ...]:
    """The spatial size the autoencoder trains on: ``data.patch_size`` or the whole ``data.image_size``."""
    size = config.data.patch_size if config.data.patch_size is not None else config.data.image_size
    return tuple(size)[: config.autoencoder.spatial_dims]


def discriminator_min_size(num_layers_d: int) -> int:
    """Smallest axis length MONAI's PatchDiscriminator trains on with batch 1 (kernel 4, padding 1; strides
    2, ..., 2, 1, 1)."""

    def fits(size: int) -> bool:
        strides = [2] * num_layers_d + [1, 1]
        for index, stride in enumerate(strides):
            size = (size + 2 - 4) // stride + 1
            if size < (1 if index == len(strides) - 1 else 2):  # BatchNorm needs > 1 value per channel
                return False
        return True

    return next(n for n in range(1, 1 << 16) if fits(n))


def valid_sizes_near(sizes: tuple[int, ...], totals: tuple[int, ...]) -> str | None:
    """The nearest valid sizes (``'24 or 32 x 32 x 32'``) when a size is not a multiple of its total factor,
    else None."""
    if all(s % f == 0 for s, f in zip(sizes, totals)):
        return None
    return " x ".join(nearest_valid_sizes(s, f) if s % f else str(s) for s, f in zip(sizes, totals))


def resize_levels(values: list[Any], levels: int) -> list[Any]:
    """A per-level list cut to ``levels`` entries (the deepest dropped) or extended by repeating its last."""
    return list(values[:levels]) + [values[-1]] * max(0, levels - len(values))


def with_factors(config: Config, factors: list[Any]) -> Config:
    """``config`` with the autoencoder's ``downsample_factors`` set to ``factors`` and its per-level lists
    (``num_channels``, ``attention_levels``, a per-level ``num_res_blocks``) resized to ``len(factors) + 1``
    levels by :func:`resize_levels`: ``[16]`` on ``[32, 64, 64]`` with attention ``[false, false, true]``
    builds ``[32, 64]`` without attention. The factor study and the budget search both build their
    variants here, so they build the same network for the same factors.

    The result is not checked (this module sits below the rules): check it for the stage that uses it, e.g.
    ``config_from_dict(config_to_dict(variant))``, which raises ConfigError when the factors do not divide
    ``data.image_size``.
    """
    ae = config.autoencoder
    levels = len(factors) + 1
    blocks = resize_levels(ae.num_res_blocks, levels) if isinstance(ae.num_res_blocks, list) else ae.num_res_blocks
    network = dataclasses.replace(ae, downsample_factors=copy.deepcopy(factors),
                                  num_channels=resize_levels(ae.num_channels, levels),
                                  attention_levels=resize_levels(ae.attention_levels, levels), num_res_blocks=blocks)
    return dataclasses.replace(config, autoencoder=network)
