"""The budget search: which (factors, batch, precision, checkpointing, patch) settings fit a GPU, and the
YAML file ``estimate_memory.py --budget`` writes for the best of them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_diffusion.config import Config, config_from_dict, config_to_dict
from monai_diffusion.config.geometry import autoencoder_totals, discriminator_min_size, with_factors
from monai_diffusion.errors import ConfigError, RunError
from monai_diffusion.memory.counting import with_margin
from monai_diffusion.memory.estimates import _estimate_fake, ddp_world_size
from monai_diffusion.memory.pipeline import estimate_pipeline
from monai_diffusion.memory.report import SHOWN_ROWS, candidates_table, pipeline_report
from monai_diffusion.runs.atomic import atomic_write

__all__ = ["Candidate", "DEFAULT_FACTOR_OPTIONS", "PATCH_FRACTIONS", "patch_options", "search_budget",
           "parse_budget", "candidate_config", "write_for_budget", "SEARCHED_BATCHES"]

SEARCHED_BATCHES = (8, 4, 2, 1)  # batch sizes --budget tries, largest first


@dataclass
class Candidate:
    """One configuration the budget search found to fit."""

    downsample_factors: list
    num_channels: list[int]
    attention_levels: list[bool]
    batch_size: int
    mixed_precision: bool
    checkpointing: bool
    total: int
    compression: int
    patch_size: list[int] | None = None  # None: whole volumes

    def overrides(self) -> dict[str, Any]:
        return {"downsample_factors": self.downsample_factors, "num_channels": self.num_channels,
                "attention_levels": self.attention_levels}


DEFAULT_FACTOR_OPTIONS: list[list[Any]] = [[2, 2], [4, 2], [8, 2], [16]]


PATCH_FRACTIONS = (0.75, 0.5, 0.375, 0.25)  # patch sizes tried, as fractions of each axis of the volume


def patch_options(image_size: tuple[int, ...], totals: tuple[int, ...], smallest: int = 1) -> list[tuple[int, ...]]:
    """Patch sizes for the budget search, largest first: fractions of the volume rounded down to the latent
    grid (at least one latent voxel per axis), each axis at least ``smallest`` voxels (what the
    discriminator needs)."""
    options: list[tuple[int, ...]] = []
    for fraction in PATCH_FRACTIONS:
        patch = tuple(max(f, int(s * fraction) // f * f) for s, f in zip(image_size, totals))
        if patch not in options and patch != tuple(image_size) and min(patch) >= smallest:
            options.append(patch)
    return options


def _factor_variant(config: Config, factors: list[Any]) -> Config | None:
    """``config`` with ``factors`` (:func:`~monai_diffusion.config.geometry.with_factors`, as the factor study
    builds it) and no patch (the search chooses it), or None if that does not fit the volume."""
    variant = with_factors(config, factors)
    raw = config_to_dict(variant)
    raw["data"]["patch_size"] = None  # the search chooses the patch
    try:
        return config_from_dict(raw)
    except ConfigError:
        return None  # this factor option does not fit the volume size: not a candidate


def search_budget(
    config: Config,
    budget_bytes: float,
    factor_options: list[list[Any]] | None = None,
    batch_sizes: tuple[int, ...] = SEARCHED_BATCHES,
    patches: bool | None = None,
    world_size: int | None = None,
) -> list[Candidate]:
    """The (factors, batch, mixed precision, checkpointing, patch) settings whose estimated training step fits
    ``budget_bytes`` with the GPU margin: ``estimate * (1 + FRAGMENTATION) + CUDA_RESERVED_BYTES <= budget``.

    A factor option with fewer steps than ``num_channels`` levels drops the deepest levels (``[16]`` with
    ``[32, 64, 64]`` uses ``[32, 64]``); options that do not divide ``data.image_size`` are skipped. For each
    factor option, precision setting and batch size, whole volumes are tried first and then, with
    ``patches`` (default: when the config trains on patches, or when no whole-volume setting fits),
    patch sizes from :func:`patch_options`, keeping the largest patch that fits. Ranked by least
    compression, then the largest patch, then the largest batch, then full precision, then no checkpointing.
    ``world_size``: as :func:`estimate_autoencoder`'s.
    """
    found: list[Candidate] = []
    size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]
    processes = ddp_world_size(world_size)

    def scan(with_patches: bool) -> None:
        for factors in factor_options or DEFAULT_FACTOR_OPTIONS:
            variant = _factor_variant(config, factors)
            if variant is None:
                continue
            ae = variant.autoencoder
            totals = autoencoder_totals(variant)
            compression = round(math.prod(size) / math.prod(s // f for s, f in zip(size, totals)))
            sizes: list[tuple[int, ...] | None] = [None]
            if with_patches and ae.spatial_dims == 3:
                smallest = (discriminator_min_size(ae.discriminator.num_layers_d)
                            if ae.training.use_adversarial_loss else 1)
                sizes += patch_options(size, totals, smallest)
            for batch in batch_sizes:
                for amp in (False, True):
                    for ckpt in (False, True):
                        for patch in sizes:  # the largest that fits
                            samples = batch * (config.data.patches_per_volume if patch else 1)
                            estimate = _estimate_fake(variant, patch or size, samples, amp, ckpt, world_size=processes)
                            if with_margin(estimate.total) <= budget_bytes:
                                found.append(Candidate(factors, list(ae.num_channels), list(ae.attention_levels), batch,
                                                       amp, ckpt, estimate.total, compression,
                                                       list(patch) if patch else None))
                                break

    scan(with_patches=bool(patches) or (patches is None and config.data.patch_size is not None))
    if not found and patches is None:
        scan(with_patches=True)  # the whole volume does not fit: patch training is the way in
    found.sort(key=lambda c: (c.compression, -math.prod(c.patch_size or size), -c.batch_size, c.mixed_precision,
                              c.checkpointing))
    return found


def parse_budget(text: str) -> float:
    """``24GB``, ``24 GiB``, ``500MB`` or a plain number of bytes."""
    units = {"gib": 2**30, "gb": 1e9, "mib": 2**20, "mb": 1e6, "kib": 2**10, "kb": 1e3, "b": 1}
    cleaned = text.strip().lower().replace(" ", "")
    for unit in units:
        if cleaned.endswith(unit):
            number, size = cleaned[: -len(unit)], units[unit]
            break
    else:
        number, size = cleaned, 1
    try:
        value = float(number) * size
    except ValueError:
        raise ValueError(f"--budget {text!r}: expected a size such as 24GB, 80GiB or 500MB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--budget {text!r}: expected a finite size above zero, such as 24GB, 80GiB or 500MB")
    return value


def candidate_config(config: Config, candidate: Candidate) -> dict[str, Any]:
    """``config`` with ``candidate``'s network and training settings, as a YAML mapping that loads."""
    raw = config_to_dict(config)
    raw["autoencoder"].update(candidate.overrides())
    raw["autoencoder"]["training"].update(batch_size=candidate.batch_size, mixed_precision=candidate.mixed_precision,
                                          use_gradient_checkpointing=candidate.checkpointing)
    raw["data"]["patch_size"] = candidate.patch_size
    config_from_dict(raw)  # the written file must load
    return raw


def _check_output(output: Path) -> None:
    """RunError naming ``--output`` unless a new file can be written at ``output``."""
    from monai_diffusion.runs.folders import check_writable

    if output.exists():
        raise RunError(f"--output: {output} already exists; choose another file (nothing was overwritten)")
    if not output.parent.is_dir():
        raise RunError(f"--output: cannot write {output}: its folder {output.parent} does not exist; create it "
                       f"or choose another file")
    check_writable(output.parent, "--output")


def write_for_budget(config: Config, budget_text: str, output: Path, batch_size: int | None = None,
                     world_size: int | None = None, show_all: bool = False) -> Path:
    """``estimate_memory.py --budget``: search the settings that fit ``budget_text`` (e.g. ``24GB``), print
    the table, write the best one to the new file ``output`` (a config that loads) and print the later
    phases of its pipeline.

    Args:
        config: the config to start from.
        budget_text: the GPU memory, as given (:func:`parse_budget`).
        output: the YAML file to write; it must not exist.
        batch_size: search only this batch size (default :data:`SEARCHED_BATCHES`).
        world_size: processes of the DDP job (see ``estimate_autoencoder``).
        show_all: print every configuration that fits (default: the best of each factor option, then the
            rest up to ``report.SHOWN_ROWS`` rows).

    Returns:
        ``output``. Raises ConfigError for a bad budget or when nothing fits, RunError when ``output`` cannot be
        written; nothing is written then.
    """
    import yaml

    try:
        budget = parse_budget(budget_text)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_output(output)
    batches = (batch_size,) if batch_size is not None else SEARCHED_BATCHES
    candidates = search_budget(config, budget, batch_sizes=batches, world_size=world_size)
    if not candidates:
        options = ", ".join(map(str, DEFAULT_FACTOR_OPTIONS))
        raise ConfigError(
            f"--budget {budget_text}: no searched configuration fits (factors {options}; batch "
            f"{'-'.join(map(str, batches))}; mixed precision; checkpointing); reduce autoencoder.num_channels or "
            f"data.image_size"
        )
    print(candidates_table(candidates, budget_text, shown=None if show_all else SHOWN_ROWS, written=candidates[0]))
    chosen = candidate_config(config, candidates[0])
    text = yaml.safe_dump(chosen, sort_keys=False).encode("utf-8")
    try:
        atomic_write(output, lambda handle: handle.write(text), overwrite=False)
    except FileExistsError:
        raise RunError(f"--output: {output} already exists (written by another command meanwhile); choose another "
                       f"file (nothing was overwritten)") from None
    except OSError as err:
        raise RunError(f"--output: cannot write {output} ({err.strerror}); choose another file") from None
    print(f"wrote the row marked * (the least compression that fits) to {output}: "
          f"python monai_diffusion/3d_ldm/train_autoencoder.py --config {output}")
    # the budget decided on the training step; the later phases (whole-volume inference) are shown beside it
    written = config_from_dict(chosen)
    print(f"\nthe whole-volume pipeline of {output}, phase by phase (the budget is checked on the training step; "
          f"these phases run later):\n" + pipeline_report(estimate_pipeline(written, world_size=world_size)))
    return output
